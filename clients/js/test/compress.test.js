// Compression on TCP: the client asks at login ("compress": "deflate"); the server that agrees
// sends packets whose seq has bit 15 set with a raw DEFLATE body, which the client inflates.
import assert from "node:assert/strict";
import { it } from "node:test";
import { userKey, channelKey } from "../zim.js";
import { missingFeature, nextPushes, unique, useServer } from "../test-support/server.js";

const files = useServer();

it("receives deflated packets on TCP when it asks, and plain ones when it does not", async (t) => {
  const { server, connect } = files;
  const bob = await connect(server.tcpUrl, { name: unique("bob"), compress: true });
  if (!bob.compressed) return missingFeature(t, "TCP compression (a login answer with \"compress\": \"deflate\")");
  const plain = await connect(server.tcpUrl, { name: unique("carol") });
  const alice = await connect(server.wsUrl, { name: unique("alice") });
  assert.equal(plain.compressed, false);
  const room = unique("room");
  for (const client of [alice, bob, plain]) await client.join(room);
  const text = "the quick brown fox jumps over the lazy dog; ".repeat(40);
  await alice.sendUser(bob.userId, `dm ${text}`);
  await alice.sendChannel(room, `room ${text}`);
  const pushes = await nextPushes(bob, 2);
  assert.deepEqual(pushes.map((push) => [push.conversation, push.content]),
    [[userKey(alice.userId), `dm ${text}`], [channelKey(room), `room ${text}`]]);
  assert.ok(bob.inflatedPackets >= 2, `${bob.inflatedPackets} compressed packets`);
  const history = await bob.history({ channel: room });             // a compressed answer, by its seq
  assert.equal(history.messages.at(-1).content, `room ${text}`);
  assert.equal((await nextPushes(plain, 1))[0].content, `room ${text}`);
  assert.equal(plain.inflatedPackets, 0);
});

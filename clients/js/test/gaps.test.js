// Gap filling: pushes arrive in seq order per conversation with no hole, read from history when
// the server merged and skipped some (--push-window-ms, 103 with skipped > 0) and after a
// disconnect. One server for the file, merging channel pushes.
import assert from "node:assert/strict";
import { it } from "node:test";
import { Action, channelKey, userKey } from "../zim.js";
import { nextPushes, unique, useServer } from "../test-support/server.js";

const WINDOW_MS = 300;
const files = useServer(["--push-window-ms", String(WINDOW_MS), "--push-max", "2"]);
const user = (url, options = {}) => files.connect(url, { name: unique("u"), ...options });

for (const transport of ["ws", "tcp"]) {
  it(`fills what a 103 skipped from history, in order (${transport})`, async () => {
    const room = unique("room");
    const alice = await user(files.server.wsUrl);
    const bob = await user(transport === "tcp" ? files.server.tcpUrl : files.server.wsUrl);
    const batches = [];
    const packet = bob._packet.bind(bob);
    bob._packet = (conn, action, seq, raw) => {      // watch what the server sent, as it came
      if (action === Action.PUSH_CHANNEL_BATCH) batches.push(JSON.parse(new TextDecoder().decode(raw)));
      packet(conn, action, seq, raw);
    };
    await alice.join(room);
    await bob.join(room);
    for (let i = 1; i <= 7; i++) await alice.sendChannel(room, `m${i}`);   // one slice: 2 pushed, 5 skipped
    const pushes = await nextPushes(bob, 7);
    assert.deepEqual(pushes.map((push) => push.seq), [1, 2, 3, 4, 5, 6, 7]);
    assert.deepEqual(pushes.map((push) => push.content), ["m1", "m2", "m3", "m4", "m5", "m6", "m7"]);
    assert.ok(pushes.every((push) => push.conversation === channelKey(room) && push.action === 102));
    assert.ok(batches.some((batch) => batch.skipped > 0), JSON.stringify(batches));
    assert.deepEqual(pushes.map((push) => push.filled), [true, true, true, true, true, false, false]);
    // a second burst: the hole is after seq 7, which bob has
    for (let i = 8; i <= 12; i++) await alice.sendChannel(room, `m${i}`);
    const more = await nextPushes(bob, 5);
    assert.deepEqual(more.map((push) => push.seq), [8, 9, 10, 11, 12]);
  });
}

it("fills a channel and a direct conversation from history after a disconnect", async () => {
  const room = unique("room");
  const alice = await user(files.server.wsUrl);
  const bob = await user(files.server.tcpUrl, { backoff: [1500, 1500] });   // a reconnect 0.75..1.5 s later
  await alice.join(room);
  await bob.join(room);
  await alice.sendChannel(room, "before");
  await alice.sendUser(bob.userId, "dm before");
  const first = await nextPushes(bob, 2);
  assert.deepEqual(first.map((push) => push.content).sort(), ["before", "dm before"]);
  bob.dropConnection();
  for (let i = 1; i <= 3; i++) {
    await alice.sendChannel(room, `away ${i}`);
    await alice.sendUser(bob.userId, `dm away ${i}`);
  }
  const pushes = await nextPushes(bob, 6, 10000);
  assert.equal(bob.reconnects, 1);
  const inRoom = pushes.filter((push) => push.conversation === channelKey(room));
  const direct = pushes.filter((push) => push.conversation === userKey(alice.userId));
  assert.deepEqual(inRoom.map((push) => [push.seq, push.content, push.filled]),
    [[2, "away 1", true], [3, "away 2", true], [4, "away 3", true]]);
  assert.deepEqual(direct.map((push) => [push.seq, push.content]), [[2, "dm away 1"], [3, "dm away 2"], [4, "dm away 3"]]);
  // and it goes on as before
  await alice.sendUser(bob.userId, "after");
  assert.equal((await bob.nextPush(5000)).seq, 5);
});

it("resumes from saved lastSeqs in a new client (a page reload)", async () => {
  const room = unique("room");
  const alice = await user(files.server.wsUrl);
  const bob = await user(files.server.wsUrl);
  await alice.join(room);
  await bob.join(room);
  await alice.sendChannel(room, "seen");
  await nextPushes(bob, 1);
  const saved = { token: bob.token, lastSeqs: bob.lastSeqs };
  bob.close();
  await alice.sendChannel(room, "missed 1");
  await alice.sendChannel(room, "missed 2");
  const again = await user(files.server.wsUrl, saved);
  const pushes = await nextPushes(again, 2);
  assert.deepEqual(pushes.map((push) => [push.seq, push.content, push.filled]), [[2, "missed 1", true], [3, "missed 2", true]]);
  await assert.rejects(again.nextPush(WINDOW_MS * 3), (error) => error.name === "TimeoutError");    // no duplicate
});

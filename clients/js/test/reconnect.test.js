// Reconnect after the server restarts: the client logs in again with its token and fills what
// it missed. The server keeps its store (sqlite in a data directory) across the restart.
import assert from "node:assert/strict";
import { it } from "node:test";
import { channelKey } from "../zim.js";
import { ZimServer, nextPushes, unique, useServer } from "../test-support/server.js";

const files = useServer([], { start: false });
const connect = (url, options) => files.connect(url, options);

for (const transport of ["ws", "tcp"]) {
  it(`reconnects after the server restarts, with its token, and fills the gap (${transport})`, async () => {
    const server = files.server = await ZimServer.start();
    const url = transport === "tcp" ? server.tcpUrl : server.wsUrl;
    const room = unique("room");
    const states = [];
    const bob = await connect(url, { name: "bob", backoff: [100, 400], onState: (state) => states.push(state) });
    const alice = await connect(server.wsUrl, { name: "alice", reconnect: false });
    await alice.join(room);
    await bob.join(room);
    await alice.sendChannel(room, "before the restart");
    assert.equal((await bob.nextPush(5000)).content, "before the restart");
    const { userId, token } = bob;

    await server.stop();
    alice.close();
    await new Promise((r) => setTimeout(r, 300));       // bob tries and fails meanwhile
    await server.run();                                 // the same ports and data
    const again = await connect(server.wsUrl, { name: "alice", token: alice.token });
    await again.sendChannel(room, "after 1");
    await again.sendChannel(room, "after 2");

    const pushes = await nextPushes(bob, 2, 10000);
    assert.deepEqual(pushes.map((push) => [push.conversation, push.seq, push.content]),
      [[channelKey(room), 2, "after 1"], [channelKey(room), 3, "after 2"]]);
    assert.ok(bob.reconnects >= 1);
    assert.equal(bob.userId, userId);
    assert.notEqual(bob.token, token);                   // each login answers a fresh token
    assert.deepEqual(states.slice(0, 3), ["connecting", "ready", "reconnecting"]);
    assert.equal(states.at(-1), "ready");
    await server.stop();
  });
}

// Login, direct messages, channels, history and the mailbox, over WebSocket and TCP, against a
// real server (one for the file).
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { Closed, ZimError, connect, channelKey, userKey } from "../zim.js";
import { nextPushes, unique, useServer } from "../test-support/server.js";

const files = useServer();
const url = (transport) => (transport === "tcp" ? files.server.tcpUrl : files.server.wsUrl);
const user = (transport, name = unique("u"), options = {}) => files.connect(url(transport), { name, ...options });

for (const transport of ["ws", "tcp"]) {
  describe(`over ${transport}`, () => {
    it("logs in as a new user, then again with the token", async () => {
      const alice = await user(transport);
      assert.match(alice.userId, /^\d+$/);
      assert.ok(alice.token);
      const again = await user(transport, "alice again", { token: alice.token });
      assert.equal(again.userId, alice.userId);
    });

    it("refuses a bad token with ZimError unauthorized", async () => {
      await assert.rejects(connect(url(transport), { name: "x", token: "v2.1.0.0.nope" }), (error) => error instanceof ZimError && error.code === "unauthorized");
    });

    it("sends a direct message, pushed to the receiver in order", async () => {
      const alice = await user(transport), bob = await user(transport);
      const sent = [];
      for (let i = 0; i < 5; i++) sent.push(await alice.sendUser(bob.userId, `dm ${i}`));
      const pushes = await nextPushes(bob, 5);
      assert.deepEqual(pushes.map((push) => push.content), ["dm 0", "dm 1", "dm 2", "dm 3", "dm 4"]);
      assert.deepEqual(pushes.map((push) => push.seq), sent.map((answer) => answer.seq));
      assert.ok(pushes.every((push) => push.action === 101 && push.conversation === userKey(alice.userId)));
      assert.deepEqual(bob.lastSeqs, { [userKey(alice.userId)]: 5 });
    });

    it("joins a channel, sends to it, reads its history, leaves it", async () => {
      const room = unique("room");
      const alice = await user(transport), bob = await user(transport);
      await alice.join(room);
      await bob.join(room);
      await alice.sendChannel(room, "one");
      await alice.sendChannel(room, "two");
      const pushes = await nextPushes(bob, 2);
      assert.deepEqual(pushes.map((push) => [push.action, push.conversation, push.seq, push.content]),
        [[102, channelKey(room), 1, "one"], [102, channelKey(room), 2, "two"]]);
      const page = await bob.history({ channel: room, limit: 1 });
      assert.deepEqual(page.messages.map((message) => message.content), ["two"]);
      assert.equal(page.hasMore, true);
      const older = await bob.history({ channel: room, beforeSeq: 2 });
      assert.deepEqual(older.messages.map((message) => message.content), ["one"]);
      assert.deepEqual(await bob.leave(room), {});
      await assert.rejects(bob.history({ channel: room }), (error) => error.code === "forbidden");
    });

    it("pulls and acknowledges the mailbox", async () => {
      const alice = await user(transport);
      const bob = await user(transport, unique("bob"), { autoAck: false });
      const bobId = bob.userId, bobToken = bob.token;
      bob.close();
      await alice.sendUser(bobId, "while away 1");
      await alice.sendUser(bobId, "while away 2");
      const raw = await files.connect(url(transport), { autoAck: false });  // not logged in: the login below is ours
      await raw.login({ name: "bob", token: bobToken });
      const page = await raw.pull();
      assert.deepEqual(page.messages.map((message) => message.content), ["while away 1", "while away 2"]);
      assert.deepEqual(await raw.ack(page.messages.map((message) => message.id)), {});
      assert.deepEqual((await raw.pull()).messages, []);
    });

    it("delivers mailbox messages after a login and acknowledges them (autoAck)", async () => {
      const alice = await user(transport);
      const bob = await user(transport);
      const { userId: bobId, token } = bob;
      bob.close();
      await alice.sendUser(bobId, "kept for you");
      const back = await user(transport, "bob", { token });
      const [push] = await nextPushes(back, 1);
      assert.equal(push.content, "kept for you");
      const deadline = Date.now() + 3000;
      while ((await back.pull()).messages.length && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual((await back.pull()).messages, []);
    });
  });
}

it("ends pushes() and fails requests with Closed once closed", async () => {
  const alice = await user("ws");
  const iterator = alice.pushes();
  const next = iterator.next();
  alice.close();
  assert.deepEqual(await next, { value: undefined, done: true });
  await assert.rejects(alice.request(9), Closed);
  await assert.rejects(alice.nextPush(100), Closed);
});

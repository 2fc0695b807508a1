// Login with a JWT from the application's backend (action 1 with "jwt"; the server's --jwt-key).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { it } from "node:test";
import { ZimError, userKey } from "../zim.js";
import { ZimServer, hs256, missingFeature, nextPushes, secretFile, serverHasFlag, useServer } from "../test-support/server.js";

const files = useServer([], { start: false });
const connect = (url, options) => files.connect(url, options);

it("logs in with a JWT, comes back as the same user, joins the private channels it grants", async (t) => {
  if (!serverHasFlag("--jwt-key")) return missingFeature(t, "JWT logins (--jwt-key)");
  const secret = randomBytes(32).toString("hex");
  const keyFile = secretFile(mkdtempSync(join(tmpdir(), "zim-jwt-")), secret);
  const server = files.server = await ZimServer.start(["--jwt-key", keyFile]);
  const exp = Math.floor(Date.now() / 1000) + 600;
  const room = "staff-room";
  const alice = await connect(server.wsUrl, { name: "alice", jwt: await hs256(secret, { sub: "1001", exp }) });
  const bob = await connect(server.tcpUrl, { name: "bob", jwt: await hs256(secret, { sub: "1002", exp, channels: [room] }) });
  assert.equal(alice.userId, "1001");             // the JWT's sub is the zim user id
  assert.ok(alice.token);
  await alice.sendUser(bob.userId, "signed in by the app");
  const [push] = await nextPushes(bob, 1);
  assert.deepEqual([push.conversation, push.content], [userKey(alice.userId), "signed in by the app"]);
  const again = await connect(server.wsUrl, { name: "alice", jwt: await hs256(secret, { sub: "1001", exp }) });
  assert.equal(again.userId, alice.userId);
  await assert.rejects(connect(server.wsUrl, { name: "mallory", jwt: await hs256("not the secret", { sub: "1001", exp }) }),
    (error) => error instanceof ZimError && error.code === "unauthorized");

  // a private channel: bob's JWT grants it, carol's does not
  await bob.join(room, { private: true });
  const carol = await connect(server.wsUrl, { name: "carol", jwt: await hs256(secret, { sub: "1003", exp }) });
  await assert.rejects(carol.join(room), (error) => error instanceof ZimError && error.code === "forbidden");
  await bob.sendChannel(room, "staff only");
  assert.deepEqual((await bob.history({ channel: room })).messages.map((message) => message.content), ["staff only"]);
});

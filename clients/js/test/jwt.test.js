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

it("logs in with a JWT, and comes back as the same user; a forged one is unauthorized", async (t) => {
  if (!serverHasFlag("--jwt-key")) return missingFeature(t, "JWT logins (--jwt-key)");
  const secret = randomBytes(32).toString("hex");
  const keyFile = secretFile(mkdtempSync(join(tmpdir(), "zim-jwt-")), secret);
  const server = files.server = await ZimServer.start(["--jwt-key", keyFile]);
  const exp = Math.floor(Date.now() / 1000) + 600;
  const alice = await connect(server.wsUrl, { name: "alice", jwt: await hs256(secret, { sub: "alice-1", exp }) });
  const bob = await connect(server.tcpUrl, { name: "bob", jwt: await hs256(secret, { sub: "bob-1", exp }) });
  assert.ok(alice.userId && alice.token);
  await alice.sendUser(bob.userId, "signed in by the app");
  const [push] = await nextPushes(bob, 1);
  assert.deepEqual([push.conversation, push.content], [userKey(alice.userId), "signed in by the app"]);
  const again = await connect(server.wsUrl, { name: "alice", jwt: await hs256(secret, { sub: "alice-1", exp }) });
  assert.equal(again.userId, alice.userId);
  await assert.rejects(connect(server.wsUrl, { name: "mallory", jwt: await hs256("not the secret", { sub: "alice-1", exp }) }),
    (error) => error instanceof ZimError && error.code === "unauthorized");
});

// A real zim server process for the Node tests: `python -m zim` from this checkout on free
// loopback ports, stopped (SIGTERM, then SIGKILL) at the end.
import { spawn, execFileSync } from "node:child_process";
import { chmodSync, mkdtempSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { after, before } from "node:test";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { connect as connectClient } from "../zim.js";

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const HOST = "127.0.0.1";
const PYTHON = process.env.ZIM_PYTHON ?? "python3";
// The tests make users and send as fast as they can from one address: the rate limits are off
// (as tests/conftest.py's TEST_LIMITS).
const TEST_LIMITS = ["--user-rate", "0", "--channel-rate", "0", "--max-conns-per-address", "0",
  "--address-login-rate", "0", "--address-new-user-rate", "0", "--address-auth-failure-rate", "0",
  "--channel-create-rate", "0", "--ack-rate", "0", "--read-rate", "0"];

export function env() {
  const pythonPath = [REPO_ROOT, process.env.PYTHONPATH].filter(Boolean).join(":");
  return { ...process.env, PYTHONPATH: pythonPath, PYTHONUNBUFFERED: "1" };
}

export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, HOST, () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

function canConnect(port) {
  return new Promise((resolveConnect) => {
    const socket = net.connect({ host: HOST, port });
    socket.once("connect", () => { socket.destroy(); resolveConnect(true); });
    socket.once("error", () => resolveConnect(false));
  });
}

/** The server's flags include `flag` (a feature another branch may not have yet). */
export function serverHasFlag(flag) {
  const help = execFileSync(PYTHON, ["-m", "zim", "--help"], { env: env(), encoding: "utf8" });
  return help.includes(flag);
}

/** A feature of the server is missing: skip here, fail under CI=true (CI must run every test). */
export function missingFeature(t, what) {
  const message = `the server has no ${what} yet`;
  if (process.env.CI === "true") throw new Error(`CI=true: ${message}`);
  t.skip(message);
}

export class ZimServer {
  /** Start `python -m zim` with these extra flags; `data` (a directory) keeps its store across restarts. */
  static async start(flags = [], { data, tcpPort, wsPort } = {}) {
    const server = new ZimServer(flags, data ?? mkdtempSync(join(tmpdir(), "zim-js-")),
      tcpPort ?? await freePort(), wsPort ?? await freePort());
    await server.run();
    return server;
  }

  constructor(flags, data, tcpPort, wsPort) {
    Object.assign(this, { flags, data, tcpPort, wsPort });
    this.tcpUrl = `tcp://${HOST}:${tcpPort}`;
    this.wsUrl = `ws://${HOST}:${wsPort}/`;
    this.httpUrl = `http://${HOST}:${wsPort}/`;
  }

  async run() {
    const args = ["-m", "zim", "--tcp", `${HOST}:${this.tcpPort}`, "--ws", `${HOST}:${this.wsPort}`,
      "--data", this.data, "--workers", "1", ...TEST_LIMITS, ...this.flags];
    this.proc = spawn(PYTHON, args, { env: env(), stdio: ["ignore", "ignore", "pipe"] });
    this.stderr = "";
    this.proc.stderr.on("data", (chunk) => { this.stderr += chunk; });
    this.exited = new Promise((resolveExit) => this.proc.once("exit", resolveExit));
    const deadline = Date.now() + 15000;
    for (const port of [this.tcpPort, this.wsPort]) {
      while (!(await canConnect(port))) {
        if (this.proc.exitCode != null) throw new Error(`zim server exited at start:\n${this.stderr}`);
        if (Date.now() > deadline) throw new Error(`zim server does not listen:\n${this.stderr}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /** SIGTERM (SIGKILL past 5 s); resolves once the process has exited. */
  async stop() {
    if (this.proc.exitCode != null || this.proc.signalCode != null) return;
    this.proc.kill("SIGTERM");
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 5000);
    await this.exited;
    clearTimeout(timer);
  }
}

/**
 * A test file's server and clients: `server` started before its tests with these flags
 * (`start: false`: the file starts its own into `server`), and `connect(url, options)`
 * a client closed after them, with the server.
 */
export function useServer(flags = [], { start = true } = {}) {
  const clients = [];
  const context = {
    server: null,
    async connect(url, options) {
      const client = await connectClient(url, options);
      clients.push(client);
      return client;
    },
  };
  if (start) before(async () => { context.server = await ZimServer.start(flags); });
  after(async () => {
    for (const client of clients) client.close();
    await context.server?.stop();
  });
  return context;
}

/** A name nobody else in this run has. */
export function unique(prefix) {
  return `${prefix}${process.pid}x${Math.random().toString(36).slice(2, 8)}`;
}

/** The next `count` pushes of a client (each within `ms`). */
export async function nextPushes(client, count, ms = 5000) {
  const pushes = [];
  while (pushes.length < count) pushes.push(await client.nextPush(ms));
  return pushes;
}

/** An HS256 JWT signed with `secret` (node:crypto; the test's own, as an app's backend would). */
export async function hs256(secret, claims) {
  const { createHmac } = await import("node:crypto");
  const part = (object) => Buffer.from(JSON.stringify(object)).toString("base64url");
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${unsigned}.${createHmac("sha256", secret).update(unsigned).digest("base64url")}`;
}

export function secretFile(dir, secret) {
  const path = join(dir, "jwt.secret");
  writeFileSync(path, secret);
  chmodSync(path, 0o600);
  return path;
}

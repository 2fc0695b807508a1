// zim.js: a zim client for browsers and Node 20+ (docs/protocol.md), with no dependency.
//
//   import { connect } from "./zim.js";
//   const alice = await connect("ws://127.0.0.1:8082/", { name: "alice" });  // or "tcp://127.0.0.1:8081" (Node)
//   await alice.join("room1");
//   await alice.sendChannel("room1", "hi");
//   for await (const push of alice.pushes()) console.log(push.conversation, push.seq, push.content);
//
// What it does for the application, as the Python asyncio client (zim/client/aio.py):
// - Requests carry a seq of their own; each awaits the answer with that seq. An error
//   answer rejects with ZimError (.code: "not_found", ...).
// - Pushes in order, with no hole: per conversation ("channel:NAME", or "user:ID" for the
//   direct conversation with one other user) the client keeps the last seq it delivered
//   (lastSeqs). A push past the next seq, or a 103 that skipped messages, is preceded by
//   the missing messages read from history (action 5, paging back with beforeSeq); what
//   was delivered already is dropped. The server never pushes a connection its own
//   messages: the seqs of this client's sends are skipped when they come back.
// - Reconnects: when the connection drops the client connects again with backoff
//   (0.1 s doubling to 5 s, with jitter) and logs in with the newest token; then reads
//   each tracked conversation's history past its last seq and pulls the mailbox.
// - Mailbox: direct messages to this user are acknowledged (action 8) once delivered
//   (unless autoAck is false); after each login the mailbox is pulled and acknowledged.
// - Transports: WebSocket (the global WebSocket, else the `ws` package on Node) and, on
//   Node, TCP (node:net), optionally with the server's per-packet deflate (compress: true).

export const Action = Object.freeze({
  LOGIN: 1, SEND_USER: 2, SUBSCRIBE: 3, SEND_CHANNEL: 4, HISTORY: 5, UNSUBSCRIBE: 6,
  PULL: 7, ACK: 8, HEARTBEAT: 9, REFRESH_TOKEN: 10, LOG_OUT_EVERYWHERE: 11,
  PUSH_USER_MESSAGE: 101, PUSH_CHANNEL_MESSAGE: 102, PUSH_CHANNEL_BATCH: 103,
});

const HISTORY_PAGE = 100;           // the most one history request returns (protocol, action 5)
const COMPRESSED = 0x8000;          // TCP: a packet whose seq has this bit has a raw DEFLATE body
const MAX_INFLATED = 16 << 20;      // a compressed body inflating past this is a broken server
const TCP_HEADER = 8;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** An error answer: `action` of the request, `code` from the protocol's table. */
export class ZimError extends Error {
  constructor(action, code, message) {
    super(`${code}: ${message} (action ${action})`);
    this.name = "ZimError";
    this.action = action;
    this.code = code;
  }
}

/** The connection is gone (a request in flight when it dropped, or the client closed). */
export class Closed extends Error {
  constructor(reason) {
    super(reason);
    this.name = "Closed";
  }
}

/** No answer (or no connection) within the client's timeout. */
export class TimeoutError extends Error {
  constructor(what) {
    super(`timed out: ${what}`);
    this.name = "TimeoutError";
  }
}

// -- the wire: packets and bodies ---------------------------------------------------------
export function encodeBody(body) {
  return body == null ? new Uint8Array(0) : encoder.encode(JSON.stringify(body));
}

export function decodeBody(bytes) {
  if (bytes.length === 0) return {};
  const body = JSON.parse(decoder.decode(bytes));
  if (body === null || typeof body !== "object" || Array.isArray(body)) throw new Error("body is not a JSON object");
  return body;
}

/** A TCP packet: length(4) action(2) seq(2) body, big-endian. */
export function tcpPacket(action, seq, payload) {
  const packet = new Uint8Array(TCP_HEADER + payload.length);
  const view = new DataView(packet.buffer);
  view.setUint32(0, packet.length);
  view.setUint16(4, action);
  view.setUint16(6, seq);
  packet.set(payload, TCP_HEADER);
  return packet;
}

/** A WebSocket message: action(2) seq(2) body. */
export function wsPacket(action, seq, payload) {
  const packet = new Uint8Array(4 + payload.length);
  const view = new DataView(packet.buffer);
  view.setUint16(0, action);
  view.setUint16(2, seq);
  packet.set(payload, 4);
  return packet;
}

function parseUrl(url) {
  const parsed = new URL(url);
  const scheme = parsed.protocol.replace(/:$/, "");
  if (!["tcp", "ws", "wss"].includes(scheme)) throw new Error(`zim URL must be tcp://, ws:// or wss://, not ${url}`);
  return { scheme, host: parsed.hostname.replace(/^\[|\]$/g, ""), port: Number(parsed.port) };
}

function timeoutPromise(promise, ms, what, onTimeout) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => { onTimeout?.(); reject(new TimeoutError(what)); }, ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- transports: whole packets to `sink.packet(action, seq, bodyBytes)`, then `sink.closed(reason)` --
class Transport {
  constructor(socket, sink) {
    this.socket = socket;
    this.sink = sink;
    this.done = false;
  }

  _end(reason) {
    if (this.done) return;
    this.done = true;
    this.sink.closed(reason);
  }

  /** Drop the connection at once, as a network failure would. */
  abort(reason = "dropped") {
    this._drop();
    this._end(reason);
  }

  close() {
    this._shut();
    this._end("client closed");
  }
}

class TcpTransport extends Transport {
  static async open(host, port, timeout, compress, sink) {
    const net = await import("node:net");
    const inflateRaw = compress ? (await import("node:zlib")).inflateRawSync : null;
    const socket = net.connect({ host, port });
    await timeoutPromise(new Promise((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    }), timeout, `connecting to ${host}:${port}`, () => socket.destroy());
    socket.setNoDelay(true);
    return new TcpTransport(socket, inflateRaw, sink);
  }

  constructor(socket, inflateRaw, sink) {
    super(socket, sink);
    this.inflateRaw = inflateRaw;
    this.buffer = null;
    socket.on("data", (chunk) => this._data(chunk));
    socket.on("error", (error) => this._end(error.message));
    socket.on("close", () => this._end("connection closed"));
  }

  _data(chunk) {
    let buffer = this.buffer ? Buffer.concat([this.buffer, chunk]) : chunk;
    let offset = 0;
    try {
      while (buffer.length - offset >= 4) {
        const length = buffer.readUInt32BE(offset);
        if (length < TCP_HEADER) throw new Error(`bad packet length ${length}`);
        if (buffer.length - offset < length) break;
        let seq = buffer.readUInt16BE(offset + 6);
        let body = buffer.subarray(offset + TCP_HEADER, offset + length);
        if (seq & COMPRESSED) {
          if (!this.inflateRaw) throw new Error("a compressed packet, not asked for");
          body = this.inflateRaw(body, { maxOutputLength: MAX_INFLATED });
          seq &= ~COMPRESSED;
          this.sink.inflated();
        }
        this.sink.packet(buffer.readUInt16BE(offset + 4), seq, body);
        offset += length;
        if (this.done) return;
      }
    } catch (error) {
      this.abort(`protocol error: ${error.message}`);
      return;
    }
    this.buffer = offset < buffer.length ? buffer.subarray(offset) : null;
  }

  send(action, seq, payload) {
    this.socket.write(tcpPacket(action, seq, payload));
  }

  _drop() {
    this.socket.destroy();
  }

  _shut() {
    this.socket.end();
  }
}

class WsTransport extends Transport {
  static async open(url, timeout, sink, WebSocketClass) {
    const WS = WebSocketClass ?? globalThis.WebSocket ?? (await import("ws")).default;
    const socket = new WS(url);
    socket.binaryType = "arraybuffer";
    await timeoutPromise(new Promise((resolve, reject) => {
      socket.onopen = resolve;
      socket.onerror = () => reject(new Error(`cannot connect to ${url}`));
      socket.onclose = () => reject(new Error(`cannot connect to ${url}`));
    }), timeout, `connecting to ${url}`, () => socket.close());
    return new WsTransport(socket, sink);
  }

  constructor(socket, sink) {
    super(socket, sink);
    socket.onmessage = (event) => this._message(event.data);
    socket.onerror = () => this._end("WebSocket error");
    socket.onclose = (event) => this._end(`WebSocket closed (${event.code})`);
  }

  _message(data) {
    if (typeof data === "string" || data.byteLength < 4) {
      this.abort("protocol error: not a binary packet");
      return;
    }
    const bytes = new Uint8Array(data);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.sink.packet(view.getUint16(0), view.getUint16(2), bytes.subarray(4));
  }

  send(action, seq, payload) {
    this.socket.send(wsPacket(action, seq, payload));
  }

  _drop() {
    // ws (Node) can drop at once; a browser can only close
    if (typeof this.socket.terminate === "function") this.socket.terminate();
    else this.socket.close();
  }

  _shut() {
    this.socket.close(1000);
  }
}

// -- a queue one consumer awaits -----------------------------------------------------------
class Queue {
  constructor() {
    this.items = [];
    this.waiters = [];
  }

  put(item) {
    const waiter = this.waiters.shift();
    if (waiter) waiter(item);
    else this.items.push(item);
  }

  get() {
    if (this.items.length) return Promise.resolve(this.items.shift());
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Like get, but gives up after `ms` (null: never) without losing an item. */
  getWithin(ms, what) {
    if (this.items.length || ms == null) return this.get();
    return new Promise((resolve, reject) => {
      const waiter = (item) => { clearTimeout(timer); resolve(item); };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        reject(new TimeoutError(what));
      }, ms);
      this.waiters.push(waiter);
    });
  }
}

const RESYNC = Symbol("resync");    // in the push queue: after a login, fill every tracked conversation
const END = Symbol("end");          // in the delivery queue: the client was closed

/** The key of a conversation: "channel:NAME", or "user:ID" of the other user. */
export const channelKey = (name) => `channel:${name}`;
export const userKey = (id) => `user:${id}`;

function splitKey(key) {
  const colon = key.indexOf(":");
  return [key.slice(0, colon), key.slice(colon + 1)];
}

/**
 * A zim connection that reconnects. `new Client(url, options)` then `start()`, or `connect()`.
 *
 * url: "ws://HOST:PORT/", "wss://..." or, on Node, "tcp://HOST:PORT".
 * options: name, token, jwt (how to log in: with a name, as a new user; with a token, as that
 * user again; with a JWT from the application's backend); lastSeqs ({key: seq}, from an
 * earlier run); reconnect (true); autoAck (true); timeout (ms, 10000); heartbeat (ms, 60000);
 * backoff ([first, most] ms, [100, 5000]); compress (TCP: ask for deflated packets);
 * WebSocket (a WebSocket class to use); onState(state) ("connecting", "ready",
 * "reconnecting", "closed").
 */
export class Client {
  constructor(url, options = {}) {
    this.url = url;
    this.name = options.name ?? null;
    this.token = options.token ?? null;
    this.jwt = options.jwt ?? null;
    this.userId = null;
    this.reconnect = options.reconnect ?? true;
    this.autoAck = options.autoAck ?? true;
    this.timeout = options.timeout ?? 10000;
    this.heartbeat = options.heartbeat ?? 60000;
    this.backoff = options.backoff ?? [100, 5000];
    this.compress = Boolean(options.compress);
    this.compressed = false;        // the server agreed to compress (TCP)
    this.inflatedPackets = 0;       // compressed packets received
    this.reconnects = 0;            // how many times the connection was made again
    this.WebSocket = options.WebSocket;
    this.onState = options.onState ?? null;
    this._tracks = new Map();
    for (const [key, seq] of Object.entries(options.lastSeqs ?? {})) this._tracks.set(key, { last: seq, own: new Set() });
    this._conn = null;
    this._ready = false;
    this._readyWaiters = [];
    this._waiting = new Map();      // seq -> {action, resolve, reject}
    this._seq = 0;
    this._incoming = new Queue();   // raw pushes and RESYNC, in arrival order
    this._delivered = new Queue();  // Push, an Error, or END
    this._closing = false;
    this._reconnecting = false;
    this._timer = null;
  }

  _state(state) {
    try { this.onState?.(state); } catch { /* the application's */ }
  }

  // -- life cycle ------------------------------------------------------------------------
  /** Connect (and log in, with a name, token or jwt); errors of this first attempt are thrown. */
  async start() {
    this._dispatchLoop();
    this._timer = setInterval(() => this._beat(), this.heartbeat);
    this._timer.unref?.();          // Node: heartbeats alone do not keep the process alive
    this._state("connecting");
    try {
      await this._connectOnce();
    } catch (error) {
      this.close();
      throw error;
    }
    return this;
  }

  /** Close the connection and stop; pushes() ends. */
  close() {
    if (this._closing) return;
    this._closing = true;
    clearInterval(this._timer);
    const conn = this._conn;
    this._conn = null;
    conn?.close();
    this._failWaiting(new Closed("client closed"));
    this._incoming.put(END);
    this._delivered.put(END);
    this._setReady(false);
    this._state("closed");
  }

  /** Drop the connection as a network failure would (the client reconnects). */
  dropConnection() {
    this._conn?.abort("dropped by the application");
  }

  async _open() {
    const { scheme, host, port } = parseUrl(this.url);
    const conn = { transport: null };
    const sink = {
      packet: (action, seq, body) => this._packet(conn.transport, action, seq, body),
      closed: (reason) => this._lost(conn.transport, reason),
      inflated: () => { this.inflatedPackets += 1; },
    };
    conn.transport = scheme === "tcp"
      ? await TcpTransport.open(host, port, this.timeout, this.compress, sink)
      : await WsTransport.open(this.url, this.timeout, sink, this.WebSocket);
    return conn.transport;
  }

  async _connectOnce() {
    const conn = await this._open();
    if (this._closing) {
      conn.abort("client closed");
      return;
    }
    this._conn = conn;
    if (this.name == null && this.token == null && this.jwt == null) this._setReady(true);
    else await this._login();
  }

  _packet(conn, action, seq, raw) {
    if (conn !== this._conn) return;
    let body;
    try {
      body = decodeBody(raw);
    } catch (error) {
      conn.abort(`protocol error: ${error.message}`);
      return;
    }
    if (seq === 0) {
      this._incoming.put([action, body]);
      return;
    }
    const waiter = this._waiting.get(seq);
    if (waiter) {
      this._waiting.delete(seq);
      waiter.resolve([action, body]);
    }
  }

  _lost(conn, reason) {
    if (conn !== this._conn || this._closing) return;
    this._conn = null;
    this._setReady(false);
    this._failWaiting(new Closed(reason));
    if (this.reconnect) {
      this._state("reconnecting");
      this._reconnectLoop();
    } else {
      this._delivered.put(new Closed(reason));
    }
  }

  _failWaiting(error) {
    const waiting = this._waiting;
    this._waiting = new Map();
    for (const waiter of waiting.values()) waiter.reject(error);
  }

  _setReady(ready) {
    this._ready = ready;
    if (ready) {
      const waiters = this._readyWaiters;
      this._readyWaiters = [];
      for (const resolve of waiters) resolve();
    }
  }

  async _reconnectLoop() {
    if (this._reconnecting) return;
    this._reconnecting = true;
    const [first, most] = this.backoff;
    try {
      for (let attempt = 0; !this._closing; attempt++) {
        await sleep(Math.min(most, first * 2 ** attempt) * (0.5 + Math.random() / 2));
        if (this._closing) return;
        try {
          await this._connectOnce();
        } catch (error) {
          if (error instanceof ZimError && ["unauthorized", "bad_request"].includes(error.code)) {
            if (error.code === "unauthorized" && this.jwt != null && this.token != null) {
              this.token = null;        // the zim token expired or was revoked: the JWT again
            } else {                    // this token or name will never do
              this._delivered.put(error);
              this.close();
              return;
            }
          }
        }
        if (this._ready) {
          this.reconnects += 1;
          return;
        }
        const conn = this._conn;
        this._conn = null;
        conn?.abort("login failed");
      }
    } finally {
      this._reconnecting = false;
    }
  }

  async _beat() {
    if (!this._ready) return;
    try { await this.request(Action.HEARTBEAT); } catch { /* a drop is seen by the transport */ }
  }

  // -- requests --------------------------------------------------------------------------
  _nextSeq() {
    do this._seq = (this._seq % 32767) + 1;
    while (this._waiting.has(this._seq));
    return this._seq;
  }

  async _call(action, body) {
    const conn = this._conn;
    if (conn == null) throw new Closed("not connected");
    const seq = this._nextSeq();
    const answer = new Promise((resolve, reject) => this._waiting.set(seq, { resolve, reject }));
    conn.send(action, seq, encodeBody(body));
    const [got, result] = await timeoutPromise(answer, this.timeout, `answer to action ${action}`,
      () => this._waiting.delete(seq));
    if (got !== action) throw new Error(`answer of action ${got} to a request of action ${action}`);
    if (result.error) throw new ZimError(action, String(result.error.code), String(result.error.message));
    return result;
  }

  async _whenReady() {
    if (this._ready) return;
    if (this._closing) throw new Closed("client closed");
    let resolve;
    const ready = new Promise((r) => { resolve = r; this._readyWaiters.push(r); });
    await timeoutPromise(ready, this.timeout, "waiting for the connection",
      () => this._readyWaiters.splice(this._readyWaiters.indexOf(resolve), 1));
  }

  /** Send a request once connected (and logged in) and return its answer's body. */
  async request(action, body = null) {
    await this._whenReady();
    return this._call(action, body);
  }

  /** Action 1 (also done by start() with a name, token or jwt); the client then logs in again so after a reconnect. */
  async login({ name = this.name, token = null, jwt = null } = {}) {
    Object.assign(this, { name, token, jwt });
    return this._login();
  }

  _loginBody() {
    const body = {};
    if (this.name != null) body.name = this.name;
    if (this.token != null) body.token = this.token;
    else if (this.jwt != null) body.jwt = this.jwt;
    if (this.compress) body.compress = "deflate";
    return body;
  }

  async _login() {
    const result = await this._call(Action.LOGIN, this._loginBody());
    this.token = result.token ?? this.token;
    this.userId = result.id;
    this.compressed = result.compress === "deflate";
    this._setReady(true);
    this._state("ready");
    this._incoming.put(RESYNC);
    return result;
  }

  /** Action 10: a fresh token (kept in `token`). */
  async renew() {
    const result = await this.request(Action.REFRESH_TOKEN);
    this.token = result.token;
    return result;
  }

  /** Action 2: a direct message; resolves to {id, seq}. */
  async sendUser(userId, content) {
    const result = await this.request(Action.SEND_USER, { receiverId: userId, content });
    this._sent(userKey(userId), result.seq);
    return result;
  }

  /** Action 4: a message to a channel you are a member of; resolves to {id, seq}. */
  async sendChannel(channel, content) {
    const result = await this.request(Action.SEND_CHANNEL, { channel, content });
    this._sent(channelKey(channel), result.seq);
    return result;
  }

  /** Action 3: join (or create) a channel; push: false for a member without pushes; private: true for a private channel. */
  async join(channel, { push, private: isPrivate } = {}) {
    const body = { name: channel };
    if (push != null) body.push = push;
    if (isPrivate) body.private = true;
    return this.request(Action.SUBSCRIBE, body);
  }

  /** Action 6: leave a channel; it is no longer tracked. */
  async leave(channel) {
    const result = await this.request(Action.UNSUBSCRIBE, { name: channel });
    this._tracks.delete(channelKey(channel));
    return result;
  }

  /** Action 5: {messages, hasMore} of a channel or of the direct conversation with userId, oldest first. */
  async history({ channel, userId, beforeSeq, limit } = {}) {
    const body = channel != null ? { channel } : { userId };
    if (beforeSeq != null) body.beforeSeq = beforeSeq;
    if (limit != null) body.limit = limit;
    return this.request(Action.HISTORY, body);
  }

  /** Action 7: {messages, hasMore}, the oldest unacknowledged direct messages. */
  async pull(limit) {
    return this.request(Action.PULL, limit == null ? {} : { limit });
  }

  /** Action 8: remove these messages from the mailbox. */
  async ack(ids) {
    return this.request(Action.ACK, { ids: [...ids] });
  }

  // -- pushes --------------------------------------------------------------------------------
  /**
   * The messages pushed to this user, in seq order per conversation, with no hole and no
   * duplicate: {action, message, conversation, filled, seq, content}. Ends when the client is
   * closed; throws Closed (without reconnect) or the ZimError that stopped the reconnects.
   */
  async *pushes() {
    while (true) {
      const item = await this._delivered.get();
      if (item === END) {
        this._delivered.put(END);
        return;
      }
      if (item instanceof Error) throw item;
      yield item;
    }
  }

  [Symbol.asyncIterator]() {
    return this.pushes();
  }

  /** The next push; TimeoutError if none comes within `ms`, Closed once the client is closed. */
  async nextPush(ms = null) {
    const item = await this._delivered.getWithin(ms, "no push");
    if (item === END) {
      this._delivered.put(END);
      throw new Closed("client closed");
    }
    if (item instanceof Error) throw item;
    return item;
  }

  /** The last seq delivered per tracked conversation: save it to resume later (options.lastSeqs). */
  get lastSeqs() {
    const seqs = {};
    for (const [key, track] of this._tracks) if (track.last != null) seqs[key] = track.last;
    return seqs;
  }

  _key(message) {
    if ("channel" in message) return channelKey(message.channel);
    const sender = message.sender?.id;
    return userKey(sender === this.userId ? message.receiverId : sender);
  }

  _track(key) {
    let track = this._tracks.get(key);
    if (!track) this._tracks.set(key, (track = { last: null, own: new Set() }));
    return track;
  }

  _sent(key, seq) {
    const track = this._track(key);
    if (track.last != null && seq === track.last + 1) track.last = seq;  // nothing before it is missing
    else if (track.last == null || seq > track.last) track.own.add(seq);
  }

  async _dispatchLoop() {
    while (!this._closing) {
      const item = await this._incoming.get();
      if (item === END) return;
      try {
        if (item === RESYNC) await this._resync();
        else await this._onPush(...item);
      } catch (error) {
        // Closed or TimeoutError: the connection dropped, and what was not delivered is
        // filled after the reconnect. Anything else is a server breaking the protocol.
        if (!(error instanceof Closed || error instanceof TimeoutError)) {
          console.error("zim client: a push could not be handled", error);
        }
      }
    }
  }

  async _onPush(action, body) {
    let messages, skipped, key;
    if (action === Action.PUSH_CHANNEL_BATCH) {
      messages = (body.messages ?? []).map((message) => ({ ...message, channel: body.channel }));
      skipped = body.skipped ?? 0;
      key = channelKey(body.channel);
    } else if (action === Action.PUSH_USER_MESSAGE || action === Action.PUSH_CHANNEL_MESSAGE) {
      messages = [body];
      skipped = 0;
      key = this._key(body);
    } else {
      this._delivered.put({ action, message: body, conversation: null, filled: false });
      return;
    }
    const track = this._track(key);
    let missing;
    if (messages.length) {
      const first = messages[0].seq;
      let after = track.last;
      if (after == null) {      // not tracked yet: only what the batch says it skipped
        after = first - 1 - skipped - [...track.own].filter((seq) => seq < first).length;
      }
      while (track.own.has(after + 1)) after += 1;
      missing = after < first - 1 ? await this._fetch(key, after, first) : [];
    } else if (track.last != null) {
      missing = await this._fetch(key, track.last, null);
    } else {
      const page = await this._historyPage(key, null, Math.min(HISTORY_PAGE, skipped + track.own.size));
      missing = page.messages;
    }
    this._deliver(key, missing, true);
    this._deliver(key, messages, false);
  }

  _historyPage(key, beforeSeq, limit) {
    const [kind, name] = splitKey(key);
    return this.history(kind === "channel" ? { channel: name, beforeSeq, limit } : { userId: name, beforeSeq, limit });
  }

  /** The messages of `key` with after < seq < before (null: the newest), read from history
   * backwards; what was found so far if history refuses (a channel left meanwhile). */
  async _fetch(key, after, before) {
    const [kind, name] = splitKey(key);
    let found = [];
    while (before == null || before - after > 1) {
      const limit = before == null ? HISTORY_PAGE : Math.min(HISTORY_PAGE, before - after - 1);
      let page;
      try {
        page = await this._historyPage(key, before, limit);
      } catch (error) {
        if (error instanceof ZimError) return found;
        throw error;
      }
      let messages = page.messages.filter((message) => message.seq > after);
      if (kind === "channel") messages = messages.map((message) => ({ ...message, channel: name }));
      found = messages.concat(found);
      if (!page.hasMore || messages.length < page.messages.length || !messages.length) break;
      before = messages[0].seq;
    }
    return found;
  }

  /** Deliver the messages past the conversation's last seq, in seq order; acknowledge the
   * direct ones to this user (duplicates too: they may still be in the mailbox). */
  _deliver(key, messages, filled) {
    const track = this._track(key);
    const acks = [];
    const action = key.startsWith("channel:") ? Action.PUSH_CHANNEL_MESSAGE : Action.PUSH_USER_MESSAGE;
    for (const message of [...messages].sort((a, b) => a.seq - b.seq)) {
      const seq = message.seq;
      if (action === Action.PUSH_USER_MESSAGE && message.receiverId === this.userId) acks.push(message.id);
      if (track.last != null && seq <= track.last) continue;
      track.last = seq;
      if (track.own.has(seq)) continue;
      this._delivered.put({ action, message, conversation: key, filled, seq, content: message.content });
    }
    if (track.last != null) {
      for (const seq of track.own) if (seq <= track.last) track.own.delete(seq);
      while (track.own.has(track.last + 1)) {
        track.own.delete(track.last + 1);
        track.last += 1;
      }
    }
    if (acks.length && this.autoAck && this._conn) this._call(Action.ACK, { ids: acks }).catch(() => {});
  }

  /** After a login: what each tracked conversation got meanwhile, then the mailbox. */
  async _resync() {
    for (const [key, track] of [...this._tracks]) {
      if (track.last != null) this._deliver(key, await this._fetch(key, track.last, null), true);
    }
    while (true) {
      const page = await this.pull();
      for (const message of page.messages) this._deliver(this._key(message), [message], true);
      if (!page.hasMore || !this.autoAck || !page.messages.length) break;
      await this.ack(page.messages.map((message) => message.id));
    }
  }
}

/** A started Client (connected, and logged in with a name, token or jwt). */
export async function connect(url, options = {}) {
  return new Client(url, options).start();
}

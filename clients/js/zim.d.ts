// Types of zim.js, the zim client for browsers and Node 20+ (docs/protocol.md).

export declare const Action: Readonly<{
  LOGIN: 1; SEND_USER: 2; SUBSCRIBE: 3; SEND_CHANNEL: 4; HISTORY: 5; UNSUBSCRIBE: 6;
  PULL: 7; ACK: 8; HEARTBEAT: 9; REFRESH_TOKEN: 10; LOG_OUT_EVERYWHERE: 11;
  PUSH_USER_MESSAGE: 101; PUSH_CHANNEL_MESSAGE: 102; PUSH_CHANNEL_BATCH: 103;
}>;

/** "channel:NAME", or "user:ID" for the direct conversation with user ID. */
export type ConversationKey = string;

export interface Message {
  id: string;
  seq: number;
  content: unknown;
  sender: { id: string; name: string };
  createdAt: number;
  channel?: string;
  receiverId?: string;
}

export interface Push {
  /** 101 (direct) or 102 (channel; a 103's messages come one by one as 102), or another push's own action. */
  action: number;
  message: Message | Record<string, unknown>;
  /** null for a push that is not a message. */
  conversation: ConversationKey | null;
  /** Read from history or the mailbox rather than pushed. */
  filled: boolean;
  seq?: number;
  content?: unknown;
}

export interface Page { messages: Message[]; hasMore: boolean }

export type State = "connecting" | "ready" | "reconnecting" | "closed";

export interface ClientOptions {
  /** Display name: with nothing else, logs in as a new user. */
  name?: string | null;
  /** A token of an earlier login: that user again. */
  token?: string | null;
  /** A JWT signed by the application's backend. */
  jwt?: string | null;
  /** Conversations to track from a known seq (an earlier run's client.lastSeqs). */
  lastSeqs?: Record<ConversationKey, number>;
  /** Connect again with backoff when the connection drops (default true). */
  reconnect?: boolean;
  /** Acknowledge direct messages once delivered (default true). */
  autoAck?: boolean;
  /** Milliseconds for connecting and for each request (default 10000). */
  timeout?: number;
  /** Milliseconds between heartbeats (default 60000). */
  heartbeat?: number;
  /** [first, most] milliseconds between reconnect attempts (default [100, 5000]). */
  backoff?: [number, number];
  /** TCP: ask the server for deflated packets. */
  compress?: boolean;
  /** A WebSocket class (default: globalThis.WebSocket, else the ws package). */
  WebSocket?: unknown;
  onState?: (state: State) => void;
}

export declare class ZimError extends Error {
  action: number;
  code: string;
}
export declare class Closed extends Error {}
export declare class TimeoutError extends Error {}

export declare class Client implements AsyncIterable<Push> {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  name: string | null;
  token: string | null;
  jwt: string | null;
  userId: string | null;
  /** The server agreed to compress (TCP). */
  compressed: boolean;
  inflatedPackets: number;
  reconnects: number;
  start(): Promise<Client>;
  close(): void;
  dropConnection(): void;
  request(action: number, body?: Record<string, unknown> | null): Promise<Record<string, any>>;
  login(credentials?: { name?: string | null; token?: string | null; jwt?: string | null }): Promise<{ id: string; token: string; expiresAt: number }>;
  renew(): Promise<{ token: string; expiresAt: number }>;
  sendUser(userId: string, content: unknown): Promise<{ id: string; seq: number }>;
  sendChannel(channel: string, content: unknown): Promise<{ id: string; seq: number }>;
  join(channel: string, options?: { push?: boolean; private?: boolean }): Promise<Record<string, never>>;
  leave(channel: string): Promise<Record<string, never>>;
  history(query: { channel?: string; userId?: string; beforeSeq?: number; limit?: number }): Promise<Page>;
  pull(limit?: number): Promise<Page>;
  ack(ids: Iterable<string>): Promise<Record<string, never>>;
  pushes(): AsyncGenerator<Push, void, undefined>;
  [Symbol.asyncIterator](): AsyncGenerator<Push, void, undefined>;
  nextPush(ms?: number | null): Promise<Push>;
  readonly lastSeqs: Record<ConversationKey, number>;
}

export declare function connect(url: string, options?: ClientOptions): Promise<Client>;
export declare function channelKey(name: string): ConversationKey;
export declare function userKey(id: string): ConversationKey;
export declare function encodeBody(body: unknown): Uint8Array;
export declare function decodeBody(bytes: Uint8Array): Record<string, any>;
export declare function tcpPacket(action: number, seq: number, payload: Uint8Array): Uint8Array;
export declare function wsPacket(action: number, seq: number, payload: Uint8Array): Uint8Array;

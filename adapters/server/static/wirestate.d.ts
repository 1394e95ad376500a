// Type declarations of wirestate.js, the browser client of a wirestate hub (protocol v1).
// Served beside it at /static/wirestate.d.ts; the contract is docs/client-js.md.

export type State = "connecting" | "open" | "reconnecting" | "closed";

export type GapReason = "history_evicted" | "slow_consumer" | "bus_outage" | "epoch_changed";

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface WirestateEvent<T = Json> {
  topic: string;
  /** The topic's sequence number: from 1, +1 per event, within one epoch. */
  seq: number;
  /** Publish time, ISO-8601 UTC with milliseconds. */
  ts: string;
  data: T;
  /** A source's cached value served while its breaker is open. */
  stale: boolean;
  /** Seconds since a stale value was fetched; present only with `stale: true`. */
  age?: number;
}

export interface WirestateGap {
  topic: string;
  /** First seq that will never come (inclusive); null for `epoch_changed`. */
  fromSeq: number | null;
  /** Last seq that will never come (inclusive); null for `epoch_changed`. */
  toSeq: number | null;
  reason: GapReason;
}

/**
 * An `error` frame of the hub ({code, message}), or a refusal the client ends on:
 * `unauthorized`, `auth_expired`, `policy`, `forbidden_origin`, `protocol`, `bad_url`. A rejected
 * publish also carries `connection_lost` or `closed`.
 */
export interface WirestateError {
  code: string;
  message: string;
}

export interface Handlers<T = Json> {
  /** Once per event, in seq order. */
  event?(event: WirestateEvent<T>): void;
  /** What will never come, before anything that follows it. */
  gap?(gap: WirestateGap): void;
}

export interface Subscription {
  readonly topic: string;
  unsubscribe(): void;
}

export interface Backoff {
  /** Seconds; the first retry waits a random delay in [0, base]. Default 0.5. */
  base?: number;
  /** Seconds; no retry waits more than this. Default 10. */
  cap?: number;
}

export interface Options {
  /** Sent as `?token=` on the upgrade. */
  token?: string | null;
  /** Called before every (re)connect; takes precedence over `token`. */
  getToken?: () => string | null | Promise<string | null>;
  backoff?: Backoff;
  /** Seconds to wait for the hub's `welcome` before trying again. Default 10. */
  openTimeout?: number;
  /** For tests: replacements for the browser's globals. */
  environment?: {
    WebSocket?: unknown;
    setTimeout?: (fn: () => void, ms: number) => unknown;
    clearTimeout?: (handle: unknown) => void;
    random?: () => number;
    fetch?: ((url: string, init?: object) => Promise<{ status: number }>) | null;
    window?: { addEventListener(name: string, fn: () => void): void; removeEventListener(name: string, fn: () => void): void } | null;
  };
}

export interface Client {
  readonly state: State;
  /** This connection's name in the hub's logs and `clients` topic; null until `welcome`. */
  readonly clientId: string | null;
  subscribe<T = Json>(topic: string, handlers?: Handlers<T>): Subscription;
  on(name: "state", fn: (state: State) => void): () => void;
  on(name: "error", fn: (error: WirestateError) => void): () => void;
  /** Resolves once the hub has taken the event; rejects with a WirestateError. */
  publish(topic: string, data: Json): Promise<void>;
  /** Ends the socket, every timer and every retry, for good. */
  close(): void;
}

export function connect(url: string | URL, options?: Options): Client;

/** Seconds before retry number `attempt` (from 0): random() * min(cap, base * 2^attempt). */
export function backoffDelay(backoff: Required<Backoff>, attempt: number, random?: () => number): number;

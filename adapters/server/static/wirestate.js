// wirestate.js: the browser client of a wirestate hub (protocol v1), one dependency-free ES
// module. Served by the hub at /static/wirestate.js, declarations at /static/wirestate.d.ts;
// the contract is docs/client-js.md.
//
// What it promises a page, per topic: every event once, in seq order, or a `gap` naming what
// will never come, delivered before anything that follows the hole. How:
//
// * Cursor. Per topic it keeps the epoch the hub named in `subscribed`, the newest seq it
//   delivered (`last`) and the topic's position when the subscription took effect
//   (`subscribed.seq`, `floor`). Every (re)subscribe after the first carries
//   `since = {seq: max(floor, last), epoch}`: the hub replays what is missing or says, with
//   a gap, what it cannot. Against a hub that does not report positions the cursor is
//   `last` alone (0 before any event), so nothing is missed; older events may come once.
// * Dedup. An event whose seq is not above `last` is dropped: no seq is delivered twice.
// * Epochs. A new epoch (a restarted hub) restarts the numbering: the hub's
//   `epoch_changed` gap reaches the page first, then the new epoch's events from seq 1.
//   The cursor moves to the new epoch when that gap arrives, not with `subscribed`: a
//   socket cut between the two resumes in the old epoch, and the hub says so again.
// * Liveness. A page cannot send protocol pings, so the client sends the application
//   `ping` every `ping_interval` (from `welcome`) and drops a connection that let
//   `ping_interval + ping_timeout` pass without a frame.
// * Refusals that cannot heal end the client instead of looping: a close with 1008 (policy,
//   or an expired token without getToken), and an upgrade the hub refuses with 401 for a
//   token getToken cannot replace. A browser hides an upgrade's HTTP status, so after a
//   failed open the client asks the same URL over plain HTTP, where the hub answers 401 for
//   a token it would refuse.
// * Everything else is retried with exponential backoff and full jitter (a random delay in
//   [0, min(cap, base * 2^attempt)]), at once on the page's `online` event; close() stops
//   every timer and socket for good.
//
// Each socket is handled by closures that check it is still the current one, so a dropped
// socket that reports late (a stalled close handshake) changes nothing.

const PROTOCOL = 1; // the wire protocol this client speaks; any other ends it
const DEFAULT_BACKOFF = { base: 0.5, cap: 10 };
const DEFAULT_OPEN_TIMEOUT = 10;

/**
 * Connect to a hub's WebSocket endpoint (`ws://host:port/ws`). Returns the client at once;
 * it connects in the background and keeps reconnecting until `close()`.
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

class Client {
  constructor(url, options) {
    const env = options.environment || {};
    this._url = String(url);
    this._token = options.token === undefined ? null : options.token;
    this._getToken = typeof options.getToken === "function" ? options.getToken : null;
    const backoff = { ...DEFAULT_BACKOFF, ...(options.backoff || {}) };
    if (!(backoff.base > 0) || !(backoff.cap >= backoff.base)) {
      throw new RangeError("backoff needs base > 0 and cap >= base (seconds)");
    }
    this._backoff = backoff;
    this._openTimeout = (options.openTimeout || DEFAULT_OPEN_TIMEOUT) * 1000;
    this._WebSocket = env.WebSocket || globalThis.WebSocket;
    this._setTimeout = env.setTimeout || globalThis.setTimeout.bind(globalThis);
    this._clearTimeout = env.clearTimeout || globalThis.clearTimeout.bind(globalThis);
    this._random = env.random || Math.random;
    this._fetch = env.fetch !== undefined ? env.fetch : globalThis.fetch && globalThis.fetch.bind(globalThis);
    this._window = env.window !== undefined ? env.window : globalThis.window || null;

    this.state = "connecting";
    this.clientId = null;
    this._listeners = { state: new Set(), error: new Set() };
    this._topics = new Map(); // topic -> { handlers: Set, epoch, last, floor, moving }
    this._ws = null;
    this._opened = false; // the current socket got its welcome
    this._attempt = 0; // failed attempts since the last welcome
    this._timers = new Set();
    this._retryTimer = null;
    this._pingTimer = null;
    this._deadTimer = null;
    this._probeTimer = null;
    this._pings = 0;
    this._waiting = []; // publishes made while not open: [{ topic, data, resolve, reject }]
    this._inflight = []; // sent, awaiting their answer, in send order (see _answer)
    this._refusedToken = undefined; // the token a 401 refused, when it was one
    this._online = () => this._reconnectNow();
    if (this._window && this._window.addEventListener) {
      this._window.addEventListener("online", this._online);
    }
    this._attemptConnect();
  }

  /** Listen to "state" (the new state) or "error" ({ code, message }); returns a remover. */
  on(name, fn) {
    const set = this._listeners[name];
    if (!set) throw new TypeError(`unknown client event ${JSON.stringify(name)}`);
    set.add(fn);
    return () => set.delete(fn);
  }

  /**
   * Follow `topic`: `handlers.event(e)` once per event in seq order, `handlers.gap(g)`
   * before anything after a hole. Made while down, it is sent when the socket opens.
   */
  subscribe(topic, handlers = {}) {
    if (this.state === "closed") throw new Error("the client is closed");
    if (typeof topic !== "string" || topic === "") throw new TypeError("topic must be a non-empty string");
    let entry = this._topics.get(topic);
    const fresh = entry === undefined;
    if (fresh) {
      entry = { handlers: new Set(), epoch: null, last: 0, floor: 0, moving: null };
      this._topics.set(topic, entry);
    }
    const handler = { event: handlers.event, gap: handlers.gap };
    entry.handlers.add(handler);
    if (fresh && this._opened) this._sendSubscribe(topic, entry);
    let active = true;
    return {
      topic,
      unsubscribe: () => {
        if (!active) return;
        active = false;
        entry.handlers.delete(handler);
        if (entry.handlers.size === 0 && this._topics.get(topic) === entry) {
          this._topics.delete(topic);
          if (this._opened) this._send({ type: "unsubscribe", topics: [topic] });
        }
      },
    };
  }

  /**
   * Publish `data` on `topic`. Resolves once the hub has taken it (an application ping sent
   * after it is answered), rejects with { code, message } when the hub refuses it, the
   * connection drops first (`connection_lost`: it may or may not have been published) or
   * the client is closed (`closed`). Made while down, it waits for the socket to open.
   */
  publish(topic, data) {
    if (this.state === "closed") return Promise.reject(clientError("closed", "the client is closed"));
    return new Promise((resolve, reject) => {
      const item = { topic, data: data === undefined ? null : data, resolve, reject };
      if (this._opened) this._sendPublish(item);
      else this._waiting.push(item);
    });
  }

  /** End everything: the socket, every timer, every retry. The client cannot be reused. */
  close() {
    if (this.state === "closed") return;
    this._dropSocket(1000);
    this._clearAllTimers();
    if (this._window && this._window.removeEventListener) {
      this._window.removeEventListener("online", this._online);
    }
    this._failPublishes(clientError("closed", "the client is closed"));
    this._setState("closed");
  }

  // -- connecting ------------------------------------------------------------------------

  async _attemptConnect() {
    this._retryTimer = null;
    if (this.state === "closed") return;
    let token = this._token;
    if (this._getToken) {
      try {
        token = await this._getToken();
      } catch (_) {
        this._scheduleRetry();
        return;
      }
      if (this.state === "closed") return;
    }
    if (this._refusedToken !== undefined && token === this._refusedToken) {
      this._refuse("unauthorized", "the hub refused the token (HTTP 401) and no other was given");
      return;
    }
    this._currentToken = token;
    const target = withToken(this._url, token);
    let ws;
    try {
      ws = new this._WebSocket(target);
    } catch (_) {
      this._refuse("bad_url", "the URL cannot be opened as a WebSocket");
      return;
    }
    this._ws = ws;
    this._opened = false;
    this._later("_deadTimer", this._openTimeout, () => this._lost(ws));
    ws.onmessage = (message) => {
      if (this._ws === ws) this._receive(message.data);
    };
    ws.onclose = (close) => {
      if (this._ws === ws) this._closed(ws, close.code, close.reason || "");
    };
    ws.onerror = () => {}; // a close follows every error
  }

  _closed(ws, code, reason) {
    const opened = this._opened;
    this._ws = null;
    this._connectionEnded();
    if (code === 1008) {
      if (reason === "auth_expired" && this._getToken) {
        this._scheduleRetry();
        return;
      }
      this._refuse(reason === "auth_expired" ? "auth_expired" : "policy",
        `the hub closed the connection (1008 ${reason || "policy"})`);
      return;
    }
    if (!opened) {
      this._probe(this._currentToken);
      return;
    }
    this._scheduleRetry();
  }

  // A dead or stalled socket: forget it at once (its late events are ignored) and retry.
  _lost(ws) {
    if (this._ws !== ws) return;
    this._dropSocket(4000);
    this._connectionEnded();
    this._scheduleRetry();
  }

  // Why did the upgrade fail? Only a plain HTTP request can tell a 401 from a network error.
  async _probe(token) {
    let status = 0;
    if (this._fetch) {
      // Bounded like an open: a probe that hangs (a stalled network) must not stop retries.
      const abort = typeof AbortController === "function" ? new AbortController() : null;
      const timedOut = new Promise((resolve) => {
        this._later("_probeTimer", this._openTimeout, () => {
          if (abort) abort.abort();
          resolve(null);
        });
      });
      try {
        const init = abort ? { cache: "no-store", signal: abort.signal } : { cache: "no-store" };
        const response = await Promise.race([this._fetch(httpUrl(withToken(this._url, token)), init), timedOut]);
        status = response ? response.status : 0;
      } catch (_) {
        status = 0;
      }
      this._cancel("_probeTimer");
    }
    if (this.state === "closed" || this._ws !== null) return;
    if (status === 401) {
      this._refusedToken = token;
      if (!this._getToken) {
        this._refuse("unauthorized", "the hub refused the token (HTTP 401)");
        return;
      }
    } else if (status === 403) {
      this._refuse("forbidden_origin", "the hub refused this page's origin (HTTP 403)");
      return;
    }
    this._scheduleRetry();
  }

  _scheduleRetry() {
    if (this.state === "closed") return;
    this._setState("reconnecting");
    const delay = backoffDelay(this._backoff, this._attempt, this._random);
    this._attempt += 1;
    this._later("_retryTimer", delay * 1000, () => this._attemptConnect());
  }

  _reconnectNow() {
    if (this._retryTimer === null || this.state === "closed") return;
    this._cancel("_retryTimer");
    this._attemptConnect();
  }

  _refuse(code, message) {
    this._emit("error", clientError(code, message));
    this.close();
  }

  // -- receiving -------------------------------------------------------------------------

  _receive(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (_) {
      return;
    }
    if (msg === null || typeof msg !== "object") return;
    if (this._opened || msg.type === "welcome") this._heard();
    switch (msg.type) {
      case "welcome":
        return this._welcome(msg);
      case "subscribed":
        return this._subscribed(msg);
      case "event":
        return this._event(msg);
      case "gap":
        return this._gap(msg);
      case "error":
        return this._error(msg);
      case "pong":
        return this._answer("pong", msg.id);
      default:
    }
  }

  _welcome(msg) {
    if (this._opened) return;
    if (msg.protocol !== PROTOCOL) {
      this._refuse("protocol", `the hub speaks protocol ${msg.protocol}; this client knows ${PROTOCOL}`);
      return;
    }
    this._opened = true;
    this._attempt = 0;
    this._refusedToken = undefined;
    this.clientId = msg.client_id || null;
    this._pingEvery = positive(msg.ping_interval, 30) * 1000;
    this._pingGrace = positive(msg.ping_timeout, 10) * 1000;
    this._heard();
    this._schedulePing();
    this._setState("open");
    if (this._ws === null) return; // a state listener closed the client
    for (const [topic, entry] of this._topics) this._sendSubscribe(topic, entry);
    const waiting = this._waiting;
    this._waiting = [];
    for (const item of waiting) this._sendPublish(item);
  }

  _subscribed(msg) {
    this._answer("subscribed");
    const epochs = msg.epoch || {};
    const seqs = msg.seq || {};
    const recovered = msg.recovered || {};
    for (const topic of msg.topics || []) {
      const entry = this._topics.get(topic);
      if (!entry) continue;
      const epoch = typeof epochs[topic] === "string" ? epochs[topic] : null;
      const floor = Number.isSafeInteger(seqs[topic]) ? seqs[topic] : null;
      if (epoch !== null && entry.epoch !== null && epoch !== entry.epoch && recovered[topic] === false) {
        // Moved to a new numbering: the hub's epoch_changed gap follows (it was sent the old
        // epoch in `since`) and moves the cursor. Cut before it, the resume stays in the old
        // epoch and the hub tells the page again.
        entry.moving = { epoch, floor };
        continue;
      }
      entry.moving = null;
      adopt(entry, epoch, floor);
    }
  }

  _event(msg) {
    const entry = this._topics.get(msg.topic);
    if (!entry || !Number.isSafeInteger(msg.seq) || msg.seq <= entry.last) return;
    entry.last = msg.seq;
    const event = { topic: msg.topic, seq: msg.seq, ts: msg.ts, data: msg.data, stale: Boolean(msg.stale) };
    if (msg.age !== undefined && msg.age !== null) event.age = msg.age;
    for (const handler of [...entry.handlers]) {
      if (typeof handler.event === "function") guard(() => handler.event(event));
    }
  }

  _gap(msg) {
    const entry = this._topics.get(msg.topic);
    if (!entry) return;
    let fromSeq = Number.isSafeInteger(msg.from_seq) ? msg.from_seq : null;
    const toSeq = Number.isSafeInteger(msg.to_seq) ? msg.to_seq : null;
    if (msg.reason === "epoch_changed" || toSeq === null) {
      // The numbering restarted: the cursor moves to the epoch `subscribed` named.
      if (entry.moving !== null) adopt(entry, entry.moving.epoch, entry.moving.floor);
      entry.moving = null;
      entry.last = 0;
      fromSeq = null;
    } else {
      if (toSeq <= entry.last) return; // a hole in what was already delivered: nothing lost
      if (fromSeq === null || fromSeq <= entry.last) fromSeq = entry.last + 1;
      entry.last = toSeq; // nothing inside the hole may be delivered later
    }
    const gap = { topic: msg.topic, fromSeq, toSeq: fromSeq === null ? null : toSeq, reason: msg.reason };
    for (const handler of [...entry.handlers]) {
      if (typeof handler.gap === "function") guard(() => handler.gap(gap));
    }
  }

  _error(msg) {
    const err = { code: String(msg.code), message: String(msg.message || "") };
    const head = this._inflight[0];
    if (head && head.kind === "publish" && !head.error) head.error = err;
    else if (head && head.kind === "subscribe") this._inflight.shift(); // refused, no `subscribed`
    this._emit("error", err);
  }

  // The hub answers in order: a subscribe with `subscribed` or an `error`, a publish with
  // nothing or an `error`, a ping with `pong`. So an error belongs to the oldest request
  // still waiting, and a publish is settled by the pong of the ping sent right after it.
  _answer(kind, id) {
    let until;
    if (kind === "pong") {
      until = this._inflight.findIndex((item) => item.kind === "publish" && item.id === id);
    } else {
      until = this._inflight.findIndex((item) => item.kind === "subscribe");
    }
    if (until < 0) return; // a liveness pong, or nothing was waiting
    // Anything older still waiting was dropped unanswered (the hub's rate limit drops
    // messages): a publish is settled by what is known, an error or nothing.
    for (const item of this._inflight.splice(0, until + 1)) {
      if (item.kind !== "publish") continue;
      if (item.error) item.reject(item.error);
      else item.resolve();
    }
  }

  // -- sending ---------------------------------------------------------------------------

  _sendSubscribe(topic, entry) {
    const msg = { type: "subscribe", topics: [topic] };
    if (entry.epoch !== null) {
      msg.since = { [topic]: { seq: Math.max(entry.floor, entry.last), epoch: entry.epoch } };
    }
    this._inflight.push({ kind: "subscribe" });
    this._send(msg);
  }

  _sendPublish(item) {
    const id = "p" + ++this._pings;
    this._inflight.push({ kind: "publish", id, resolve: item.resolve, reject: item.reject, error: null });
    this._send({ type: "publish", topic: item.topic, data: item.data });
    this._send({ type: "ping", id });
  }

  _send(msg) {
    const ws = this._ws;
    if (ws === null) return;
    try {
      ws.send(JSON.stringify(msg));
    } catch (_) {
      this._lost(ws);
    }
  }

  // -- liveness --------------------------------------------------------------------------

  _heard() {
    if (!this._opened) return;
    const ws = this._ws;
    this._later("_deadTimer", this._pingEvery + this._pingGrace, () => this._lost(ws));
  }

  _schedulePing() {
    this._later("_pingTimer", this._pingEvery, () => {
      this._send({ type: "ping", id: "k" + ++this._pings });
      if (this._opened) this._schedulePing();
    });
  }

  // -- bookkeeping -----------------------------------------------------------------------

  _connectionEnded() {
    this._opened = false;
    this._cancel("_pingTimer");
    this._cancel("_deadTimer");
    this._failPublishes(clientError("connection_lost", "the connection dropped before the hub answered"), true);
  }

  _dropSocket(code) {
    const ws = this._ws;
    this._ws = null;
    this._opened = false;
    if (ws === null) return;
    ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(code === 4000 ? 4000 : 1000);
    } catch (_) {
      // already closing
    }
  }

  _failPublishes(err, inflightOnly = false) {
    const inflight = this._inflight;
    this._inflight = [];
    for (const item of inflight) if (item.kind === "publish") item.reject(err);
    if (inflightOnly) return;
    const waiting = this._waiting;
    this._waiting = [];
    for (const item of waiting) item.reject(err);
  }

  _later(slot, ms, fn) {
    this._cancel(slot);
    const handle = this._setTimeout(() => {
      this._timers.delete(handle);
      if (this[slot] === handle) this[slot] = null;
      fn();
    }, ms);
    this._timers.add(handle);
    this[slot] = handle;
  }

  _cancel(slot) {
    const handle = this[slot];
    if (handle === null || handle === undefined) return;
    this._clearTimeout(handle);
    this._timers.delete(handle);
    this[slot] = null;
  }

  _clearAllTimers() {
    for (const handle of this._timers) this._clearTimeout(handle);
    this._timers.clear();
    this._retryTimer = this._pingTimer = this._deadTimer = this._probeTimer = null;
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
  }

  _emit(name, value) {
    for (const fn of [...this._listeners[name]]) guard(() => fn(value));
  }
}

/** The delay before retry number `attempt` (from 0), in seconds: full jitter. */
export function backoffDelay(backoff, attempt, random = Math.random) {
  const ceiling = Math.min(backoff.cap, backoff.base * 2 ** Math.min(attempt, 52));
  return random() * ceiling;
}

// Move a topic's cursor to `epoch` (a string, or null: unchanged) and `floor` (a seq, or
// null: unknown). A new numbering forgets the old seqs: they mean nothing in it.
function adopt(entry, epoch, floor) {
  if (epoch !== null && epoch !== entry.epoch) {
    if (entry.epoch !== null) {
      entry.last = 0;
      entry.floor = 0;
    }
    entry.epoch = epoch;
  }
  if (floor !== null) entry.floor = Math.max(entry.floor, floor);
}

function withToken(url, token) {
  if (token === null || token === undefined || token === "") return url;
  const u = new URL(url);
  u.searchParams.set("token", token);
  return u.toString();
}

function httpUrl(url) {
  const u = new URL(url);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  return u.toString();
}

function positive(value, fallback) {
  return typeof value === "number" && value > 0 && Number.isFinite(value) ? value : fallback;
}

function clientError(code, message) {
  return { code, message };
}

// A page's handler that throws must not break the client's bookkeeping.
function guard(fn) {
  try {
    fn();
  } catch (err) {
    setTimeout(() => {
      throw err;
    }, 0);
  }
}

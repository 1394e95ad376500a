// Test doubles for wirestate.js: a socket the test drives by hand, a clock that only moves
// when told, and a probe answer for the plain HTTP request after a failed open.

export class FakeClock {
  constructor() {
    this.now = 0;
    this.timers = new Map(); // id -> { at, fn }
    this.nextId = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.now + Math.max(0, ms), fn });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
  }

  /** Move forward `ms`, firing every timer due on the way, in order. */
  async advance(ms) {
    const end = this.now + ms;
    for (;;) {
      let next = null;
      for (const [id, t] of this.timers) if (t.at <= end && (next === null || t.at < next[1].at)) next = [id, t];
      if (next === null) break;
      this.timers.delete(next[0]);
      this.now = next[1].at;
      next[1].fn();
      await flush();
    }
    this.now = end;
  }

  /** Delays of the timers pending now, in ms from now. */
  pending() {
    return [...this.timers.values()].map((t) => t.at - this.now);
  }
}

export async function flush() {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

export class FakeSocketFactory {
  constructor() {
    this.sockets = [];
    const factory = this;
    this.WebSocket = class {
      constructor(url) {
        this.url = url;
        this.sent = [];
        this.closedWith = null;
        this.onmessage = this.onclose = this.onerror = null;
        factory.sockets.push(this);
      }
      send(text) {
        if (this.closedWith !== null) throw new Error("closed");
        this.sent.push(JSON.parse(text));
      }
      close(code) {
        this.closedWith = code ?? 1005;
      }
      // -- the hub's side
      deliver(msg) {
        if (this.onmessage) this.onmessage({ data: JSON.stringify(msg) });
      }
      welcome(extra = {}) {
        this.deliver({ type: "welcome", client_id: "c" + factory.sockets.length, protocol: 1, ping_interval: 1, ping_timeout: 0.5, ...extra });
      }
      drop(code = 1006, reason = "") {
        if (this.onclose) this.onclose({ code, reason });
      }
      subscribes() {
        return this.sent.filter((m) => m.type === "subscribe");
      }
    };
  }

  get last() {
    return this.sockets[this.sockets.length - 1];
  }
}

export class FakeWindow {
  constructor() {
    this.listeners = new Map();
  }
  addEventListener(name, fn) {
    this.listeners.set(name, fn);
  }
  removeEventListener(name, fn) {
    if (this.listeners.get(name) === fn) this.listeners.delete(name);
  }
  fire(name) {
    const fn = this.listeners.get(name);
    if (fn) fn();
  }
}

/** Everything a client needs, fake; `status` is what the plain HTTP probe answers. */
export function environment({ status = 426, random = () => 1 } = {}) {
  const clock = new FakeClock();
  const sockets = new FakeSocketFactory();
  const window = new FakeWindow();
  const probes = [];
  const env = {
    WebSocket: sockets.WebSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    random,
    window,
    fetch: async (url) => {
      probes.push(url);
      if (status === "hang") return new Promise(() => {});
      return { status: typeof status === "function" ? status(url) : status };
    },
  };
  return { env, clock, sockets, window, probes };
}

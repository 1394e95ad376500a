// The browser client's logic under Node's own test runner, with a fake socket and a fake
// clock: run with `node --test tests/js/` (tests/js/test_node.py runs it under pytest).
import { test } from "node:test";
import assert from "node:assert/strict";

import { backoffDelay, connect } from "../../adapters/server/static/wirestate.js";
import { environment, flush } from "./fakes.mjs";

const URL_ = "ws://127.0.0.1:12080/ws";

function ev(topic, seq, data = { n: seq }) {
  return { type: "event", topic, seq, ts: "2026-11-25T16:00:00.000Z", data, stale: false };
}

function subscribed(topic, epoch, seq) {
  const msg = { type: "subscribed", topics: [topic], recovered: { [topic]: true }, epoch: { [topic]: epoch } };
  if (seq !== undefined) msg.seq = { [topic]: seq };
  return msg;
}

// A client with one subscription recording everything it is given, in order.
async function started(options = {}, envOptions = {}) {
  const fake = environment(envOptions);
  const client = connect(URL_, { environment: fake.env, ...options });
  const log = [];
  const states = [];
  const errors = [];
  client.on("state", (s) => states.push(s));
  client.on("error", (e) => errors.push(e));
  await flush();
  return { ...fake, client, log, states, errors };
}

/** Drop `ws` with `code` (and `reason`), let the 100 ms backoff pass, welcome the new socket. */
async function reconnected(t, ws, code, reason) {
  ws.drop(code, reason);
  await t.clock.advance(100);
  const next = t.sockets.last;
  next.welcome();
  return next;
}

function follow(client, topic, log) {
  return client.subscribe(topic, {
    event: (e) => log.push(["event", e.topic, e.seq]),
    gap: (g) => log.push(["gap", g.topic, g.fromSeq, g.toSeq, g.reason]),
  });
}

test("a subscription made before the socket opens is sent when it opens", async () => {
  const t = await started();
  follow(t.client, "orders", t.log);
  assert.deepEqual(t.sockets.last.sent, []);
  t.sockets.last.welcome();
  assert.deepEqual(t.sockets.last.subscribes(), [{ type: "subscribe", topics: ["orders"] }]);
  assert.equal(t.client.state, "open");
  assert.equal(t.client.clientId, "c1");
  t.client.close();
});

test("events are delivered once, in order: a seq not above the last is dropped", async () => {
  const t = await started();
  follow(t.client, "orders", t.log);
  const ws = t.sockets.last;
  ws.welcome();
  ws.deliver(subscribed("orders", "e1", 0));
  for (const seq of [1, 2, 2, 1, 3]) ws.deliver(ev("orders", seq));
  ws.deliver(ev("other", 9)); // not subscribed: ignored
  assert.deepEqual(t.log, [["event", "orders", 1], ["event", "orders", 2], ["event", "orders", 3]]);
  t.client.close();
});

test("an event carries topic, seq, ts, data, stale, and age only when given", async () => {
  const t = await started();
  const got = [];
  t.client.subscribe("src", { event: (e) => got.push(e) });
  const ws = t.sockets.last;
  ws.welcome();
  ws.deliver(ev("src", 1, { a: 1 }));
  ws.deliver({ ...ev("src", 2, null), stale: true, age: 3.5 });
  assert.deepEqual(got, [
    { topic: "src", seq: 1, ts: "2026-11-25T16:00:00.000Z", data: { a: 1 }, stale: false },
    { topic: "src", seq: 2, ts: "2026-11-25T16:00:00.000Z", data: null, stale: true, age: 3.5 },
  ]);
  t.client.close();
});

test("on reconnect it resumes from max(subscribed.seq, last received) with the epoch", async () => {
  const t = await started({ backoff: { base: 0.1, cap: 1 } });
  follow(t.client, "quiet", t.log);
  follow(t.client, "busy", t.log);
  let ws = t.sockets.last;
  ws.welcome();
  ws.deliver(subscribed("quiet", "e1", 7)); // held 7 events, none received
  ws.deliver(subscribed("busy", "e1", 3));
  ws.deliver(ev("busy", 3)); // the retained value
  ws.deliver(ev("busy", 4));
  ws.drop(1006);
  await t.clock.advance(100);
  ws = t.sockets.last;
  assert.equal(t.sockets.sockets.length, 2);
  ws.welcome();
  assert.deepEqual(ws.subscribes(), [
    { type: "subscribe", topics: ["quiet"], since: { quiet: { seq: 7, epoch: "e1" } } },
    { type: "subscribe", topics: ["busy"], since: { busy: { seq: 4, epoch: "e1" } } },
  ]);
  t.client.close();
});

test("without subscribed.seq it resumes from the last seq received, 0 before any", async () => {
  const t = await started({ backoff: { base: 0.1, cap: 1 } });
  follow(t.client, "quiet", t.log);
  let ws = t.sockets.last;
  ws.welcome();
  ws.deliver(subscribed("quiet", "e1")); // an older hub: no position
  ws = await reconnected(t, ws, 1006);
  assert.deepEqual(ws.subscribes(), [
    { type: "subscribe", topics: ["quiet"], since: { quiet: { seq: 0, epoch: "e1" } } },
  ]);
  t.client.close();
});

test("a gap reaches the page before what follows it, and nothing inside it comes later", async () => {
  const t = await started();
  follow(t.client, "orders", t.log);
  const ws = t.sockets.last;
  ws.welcome();
  ws.deliver(subscribed("orders", "e1", 0));
  ws.deliver(ev("orders", 1));
  ws.deliver({ type: "gap", topic: "orders", from_seq: 2, to_seq: 5, reason: "history_evicted" });
  ws.deliver(ev("orders", 4)); // inside the gap: never delivered after it
  ws.deliver(ev("orders", 6));
  ws.deliver({ type: "gap", topic: "orders", from_seq: 3, to_seq: 6, reason: "slow_consumer" }); // all had
  ws.deliver({ type: "gap", topic: "orders", from_seq: 5, to_seq: 8, reason: "slow_consumer" }); // trimmed
  assert.deepEqual(t.log, [
    ["event", "orders", 1],
    ["gap", "orders", 2, 5, "history_evicted"],
    ["event", "orders", 6],
    ["gap", "orders", 7, 8, "slow_consumer"],
  ]);
  t.client.close();
});

test("a new epoch restarts the numbering: epoch_changed gap, then the new seqs", async () => {
  const t = await started({ backoff: { base: 0.1, cap: 1 } });
  follow(t.client, "orders", t.log);
  let ws = t.sockets.last;
  ws.welcome();
  ws.deliver(subscribed("orders", "old", 0));
  ws.deliver(ev("orders", 1));
  ws.deliver(ev("orders", 2));
  ws = await reconnected(t, ws, 1001, "shutdown");
  assert.deepEqual(ws.subscribes()[0].since, { orders: { seq: 2, epoch: "old" } });
  ws.deliver({ ...subscribed("orders", "new", 1), recovered: { orders: false } });
  ws.deliver({ type: "gap", topic: "orders", from_seq: null, to_seq: null, reason: "epoch_changed" });
  ws.deliver(ev("orders", 1)); // seq 1 of the new epoch is a new event
  ws.deliver(ev("orders", 2));
  assert.deepEqual(t.log, [
    ["event", "orders", 1],
    ["event", "orders", 2],
    ["gap", "orders", null, null, "epoch_changed"],
    ["event", "orders", 1],
    ["event", "orders", 2],
  ]);
  await reconnected(t, ws, 1006);
  assert.deepEqual(t.sockets.last.subscribes()[0].since, { orders: { seq: 2, epoch: "new" } });
  t.client.close();
});

test("a cut between subscribed and the epoch_changed gap resumes in the old epoch, told again", async () => {
  const t = await started({ backoff: { base: 0.1, cap: 1 } });
  follow(t.client, "orders", t.log);
  let ws = t.sockets.last;
  ws.welcome();
  ws.deliver(subscribed("orders", "old", 0));
  ws.deliver(ev("orders", 1));
  ws.deliver(ev("orders", 2));
  ws = await reconnected(t, ws, 1001, "shutdown");
  ws.deliver({ ...subscribed("orders", "new", 0), recovered: { orders: false } });
  // cut before the epoch_changed gap arrives
  ws = await reconnected(t, ws, 1006);
  assert.deepEqual(ws.subscribes()[0].since, { orders: { seq: 2, epoch: "old" } });
  ws.deliver({ ...subscribed("orders", "new", 0), recovered: { orders: false } });
  ws.deliver({ type: "gap", topic: "orders", from_seq: null, to_seq: null, reason: "epoch_changed" });
  ws.deliver(ev("orders", 1));
  assert.deepEqual(t.log, [
    ["event", "orders", 1],
    ["event", "orders", 2],
    ["gap", "orders", null, null, "epoch_changed"],
    ["event", "orders", 1],
  ]);
  await reconnected(t, ws, 1006);
  assert.deepEqual(t.sockets.last.subscribes()[0].since, { orders: { seq: 1, epoch: "new" } });
  t.client.close();
});

test("a position from the old epoch is forgotten: the resume uses the new one's", async () => {
  const t = await started({ backoff: { base: 0.1, cap: 1 } });
  follow(t.client, "quiet", t.log);
  let ws = t.sockets.last;
  ws.welcome();
  ws.deliver(subscribed("quiet", "old", 7)); // seq 7 of the old numbering, nothing received
  ws = await reconnected(t, ws, 1006);
  ws.deliver({ ...subscribed("quiet", "new", 1), recovered: { quiet: false } });
  ws.deliver({ type: "gap", topic: "quiet", from_seq: null, to_seq: null, reason: "epoch_changed" });
  await reconnected(t, ws, 1006);
  assert.deepEqual(t.sockets.last.subscribes()[0].since, { quiet: { seq: 1, epoch: "new" } });
  t.client.close();
});

test("backoff is full jitter within [0, min(cap, base * 2^attempt)]", () => {
  const b = { base: 0.5, cap: 10 };
  const ceilings = [0, 1, 2, 3, 4, 5, 6, 60].map((n) => backoffDelay(b, n, () => 1));
  assert.deepEqual(ceilings, [0.5, 1, 2, 4, 8, 10, 10, 10]);
  assert.equal(backoffDelay(b, 3, () => 0), 0);
  assert.equal(backoffDelay(b, 3, () => 0.25), 1);
  assert.throws(() => connect(URL_, { backoff: { base: 0 } }), RangeError);
});

test("retries wait the backoff's delays, growing to the cap, and reset after a welcome", async () => {
  const t = await started({}, { random: () => 1 }); // the ceiling each time: the bound itself
  const waits = [];
  for (let i = 0; i < 7; i++) {
    t.sockets.last.drop(1006);
    await flush();
    const [delay] = t.clock.pending().filter((d) => d > 0);
    waits.push(delay);
    await t.clock.advance(delay);
  }
  assert.deepEqual(waits, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
  t.sockets.last.welcome();
  t.sockets.last.drop(1006);
  await flush();
  assert.ok(t.clock.pending().includes(500), t.clock.pending());
  t.client.close();
});

test("states go connecting, open, reconnecting, open, closed", async () => {
  const t = await started({ backoff: { base: 0.1, cap: 1 } });
  assert.equal(t.client.state, "connecting");
  t.sockets.last.welcome();
  await reconnected(t, t.sockets.last, 1006);
  t.client.close();
  assert.deepEqual(t.states, ["open", "reconnecting", "open", "closed"]);
});

test("getToken is called on every (re)connect and its token goes in the URL", async () => {
  let n = 0;
  const t = await started({ getToken: async () => "tok" + ++n, backoff: { base: 0.1, cap: 1 } });
  assert.equal(new URL(t.sockets.last.url).searchParams.get("token"), "tok1");
  t.sockets.last.welcome();
  t.sockets.last.drop(1006);
  await t.clock.advance(100);
  assert.equal(new URL(t.sockets.last.url).searchParams.get("token"), "tok2");
  t.client.close();
});

test("a close with 1008 policy ends the client with an error, no retry", async () => {
  const t = await started();
  t.sockets.last.welcome();
  t.sockets.last.drop(1008, "policy");
  await flush();
  assert.equal(t.client.state, "closed");
  assert.deepEqual(t.errors.map((e) => e.code), ["policy"]);
  assert.deepEqual(t.clock.pending(), []);
  assert.equal(t.sockets.sockets.length, 1);
});

test("an expired token: closed without getToken, a fresh one with it", async () => {
  const a = await started({ token: "static" });
  a.sockets.last.welcome();
  a.sockets.last.drop(1008, "auth_expired");
  await flush();
  assert.equal(a.client.state, "closed");
  assert.deepEqual(a.errors.map((e) => e.code), ["auth_expired"]);

  let n = 0;
  const b = await started({ getToken: () => "t" + ++n, backoff: { base: 0.1, cap: 1 } });
  b.sockets.last.welcome();
  b.sockets.last.drop(1008, "auth_expired");
  await b.clock.advance(100);
  assert.equal(new URL(b.sockets.last.url).searchParams.get("token"), "t2");
  b.client.close();
});

test("an upgrade refused with 401 and a static token ends the client: no retry loop", async () => {
  const t = await started({ token: "bad" }, { status: 401 });
  t.sockets.last.drop(1006); // what a page sees of a refused upgrade
  await flush();
  assert.equal(t.probes.length, 1);
  assert.equal(t.probes[0], "http://127.0.0.1:12080/ws?token=bad");
  assert.equal(t.client.state, "closed");
  assert.deepEqual(t.errors.map((e) => e.code), ["unauthorized"]);
  assert.deepEqual(t.clock.pending(), []);
});

test("after a 401, getToken is asked for a fresh token; the same one again ends it", async () => {
  const tokens = ["old", "new", "new"];
  const t = await started({ getToken: async () => tokens.shift(), backoff: { base: 0.1, cap: 1 } }, {
    status: (url) => (url.includes("old") || url.includes("new") ? 401 : 426),
  });
  t.sockets.last.drop(1006);
  await flush();
  await t.clock.advance(100);
  assert.equal(new URL(t.sockets.last.url).searchParams.get("token"), "new");
  t.sockets.last.drop(1006);
  await flush();
  await t.clock.advance(200); // the second retry's ceiling
  assert.equal(t.sockets.sockets.length, 2); // "new" twice: not tried again
  assert.equal(t.client.state, "closed");
  assert.deepEqual(t.errors.map((e) => e.code), ["unauthorized"]);
});

test("a failed open that is not a 401 is retried", async () => {
  const t = await started({ backoff: { base: 0.1, cap: 1 } }, { status: 426 });
  t.sockets.last.drop(1006);
  await flush();
  await t.clock.advance(100);
  assert.equal(t.sockets.sockets.length, 2);
  assert.equal(t.client.state, "reconnecting");
  t.client.close();
});

test("a probe that never answers is given up after openTimeout, and retried", async () => {
  const t = await started({ openTimeout: 2, backoff: { base: 0.1, cap: 1 } }, { status: "hang" });
  t.sockets.last.drop(1006);
  await flush();
  await t.clock.advance(2000);
  assert.equal(t.client.state, "reconnecting");
  await t.clock.advance(100);
  assert.equal(t.sockets.sockets.length, 2);
  t.client.close();
  assert.deepEqual(t.clock.pending(), []);
});

test("a hub speaking another protocol version ends the client", async () => {
  const t = await started();
  t.sockets.last.welcome({ protocol: 2 });
  assert.equal(t.client.state, "closed");
  assert.deepEqual(t.errors.map((e) => e.code), ["protocol"]);
  assert.deepEqual(t.states, ["closed"]);
  assert.deepEqual(t.clock.pending(), []);
});

test("an origin refused with 403 ends the client", async () => {
  const t = await started({}, { status: 403 });
  t.sockets.last.drop(1006);
  await flush();
  assert.equal(t.client.state, "closed");
  assert.deepEqual(t.errors.map((e) => e.code), ["forbidden_origin"]);
});

test("application pings every ping_interval; a silent connection is dropped and retried", async () => {
  const t = await started({ backoff: { base: 0.1, cap: 1 } });
  const ws = t.sockets.last;
  ws.welcome({ ping_interval: 1, ping_timeout: 0.5 });
  await t.clock.advance(1000);
  assert.deepEqual(ws.sent.filter((m) => m.type === "ping").length, 1);
  ws.deliver({ type: "pong", id: ws.sent.at(-1).id });
  await t.clock.advance(1400); // heard 400 ms after the last pong: still alive
  assert.equal(t.sockets.sockets.length, 1);
  await t.clock.advance(200); // 1.5 s of silence
  assert.equal(ws.closedWith, 4000);
  assert.equal(t.client.state, "reconnecting");
  await t.clock.advance(100);
  assert.equal(t.sockets.sockets.length, 2);
  ws.deliver(ev("x", 1)); // the old socket is forgotten
  t.client.close();
});

test("a socket that never sends welcome is given up after openTimeout", async () => {
  const t = await started({ openTimeout: 2, backoff: { base: 0.1, cap: 1 } });
  await t.clock.advance(2000);
  assert.equal(t.sockets.sockets[0].closedWith, 4000);
  await t.clock.advance(100);
  assert.equal(t.sockets.sockets.length, 2);
  t.client.close();
});

test("the page's online event reconnects at once instead of waiting", async () => {
  const t = await started({ backoff: { base: 5, cap: 10 } });
  t.sockets.last.welcome();
  t.sockets.last.drop(1006);
  await flush();
  t.window.fire("online");
  await flush();
  assert.equal(t.sockets.sockets.length, 2);
  assert.equal(t.client.state, "reconnecting"); // the retry timer is gone, the socket is new
  t.sockets.last.welcome();
  assert.equal(t.client.state, "open");
  assert.ok(t.clock.pending().every((d) => d <= 1500), t.clock.pending()); // pings only
  t.client.close();
});

test("close() ends every timer and the socket, and nothing comes after", async () => {
  const t = await started();
  follow(t.client, "orders", t.log);
  const ws = t.sockets.last;
  ws.welcome();
  const waiting = t.client.publish("orders", 1);
  t.client.close();
  assert.deepEqual(t.clock.pending(), []);
  assert.equal(ws.closedWith, 1000);
  await assert.rejects(waiting, { code: "closed" });
  ws.deliver(ev("orders", 1));
  t.window.fire("online");
  await flush();
  assert.deepEqual(t.log, []);
  assert.equal(t.sockets.sockets.length, 1);
  assert.equal(t.window.listeners.size, 0);
  assert.throws(() => t.client.subscribe("x"), /closed/);
  await assert.rejects(t.client.publish("x", 1), { code: "closed" });
});

test("close() while retrying cancels the retry", async () => {
  const t = await started();
  t.sockets.last.drop(1006);
  await flush();
  assert.ok(t.clock.pending().length > 0);
  t.client.close();
  assert.deepEqual(t.clock.pending(), []);
  await t.clock.advance(60000);
  assert.equal(t.sockets.sockets.length, 1);
});

test("publish resolves once the hub answers the ping sent after it", async () => {
  const t = await started();
  const ws = t.sockets.last;
  const early = t.client.publish("orders", { id: 1 }); // while connecting: waits
  ws.welcome();
  assert.deepEqual(ws.sent.slice(0, 1), [{ type: "publish", topic: "orders", data: { id: 1 } }]);
  const ping = ws.sent[1];
  assert.equal(ping.type, "ping");
  let settled = false;
  early.then(() => (settled = true));
  await flush();
  assert.equal(settled, false);
  ws.deliver({ type: "pong", id: ping.id });
  await early;
  t.client.close();
});

test("a refused publish rejects with the hub's error, which is also an error event", async () => {
  const t = await started();
  const ws = t.sockets.last;
  ws.welcome();
  const refused = t.client.publish("clients", 1);
  const fine = t.client.publish("orders", 2);
  const pings = ws.sent.filter((m) => m.type === "ping");
  ws.deliver({ type: "error", code: "forbidden", message: "only the server publishes on this topic" });
  ws.deliver({ type: "pong", id: pings[0].id });
  ws.deliver({ type: "pong", id: pings[1].id });
  await assert.rejects(refused, { code: "forbidden" });
  await fine;
  assert.deepEqual(t.errors, [{ code: "forbidden", message: "only the server publishes on this topic" }]);
  t.client.close();
});

test("a refused subscribe takes its error; a later publish is not blamed", async () => {
  const t = await started();
  const ws = t.sockets.last;
  ws.welcome();
  follow(t.client, "secret", t.log);
  const p = t.client.publish("orders", 1);
  ws.deliver({ type: "error", code: "forbidden", message: "topic not allowed" });
  ws.deliver({ type: "pong", id: ws.sent.at(-1).id });
  await p;
  assert.deepEqual(t.errors.map((e) => e.code), ["forbidden"]);
  t.client.close();
});

test("a publish in flight when the connection drops rejects with connection_lost", async () => {
  const t = await started();
  t.sockets.last.welcome();
  const p = t.client.publish("orders", 1);
  t.sockets.last.drop(1006);
  await assert.rejects(p, { code: "connection_lost" });
  t.client.close();
});

test("unsubscribe stops delivery and tells the hub when the last handler goes", async () => {
  const t = await started();
  const ws = t.sockets.last;
  ws.welcome();
  const a = follow(t.client, "orders", t.log);
  const other = [];
  const b = follow(t.client, "orders", other);
  assert.equal(ws.subscribes().length, 1); // one wire subscription per topic
  ws.deliver(ev("orders", 1));
  a.unsubscribe();
  ws.deliver(ev("orders", 2));
  assert.equal(ws.sent.filter((m) => m.type === "unsubscribe").length, 0);
  b.unsubscribe();
  assert.deepEqual(ws.sent.at(-1), { type: "unsubscribe", topics: ["orders"] });
  ws.deliver(ev("orders", 3));
  assert.deepEqual(t.log, [["event", "orders", 1]]);
  assert.deepEqual(other, [["event", "orders", 1], ["event", "orders", 2]]);
  t.client.close();
});

test("a handler that throws does not stop the others or the bookkeeping", async () => {
  const t = await started();
  const ws = t.sockets.last;
  ws.welcome();
  const thrown = [];
  const original = process.listeners("uncaughtException");
  process.removeAllListeners("uncaughtException");
  process.on("uncaughtException", (err) => thrown.push(err.message));
  try {
    t.client.subscribe("orders", { event: () => { throw new Error("page bug"); } });
    follow(t.client, "orders", t.log);
    ws.deliver(ev("orders", 1));
    ws.deliver(ev("orders", 2));
    await new Promise((resolve) => setTimeout(resolve, 5));
  } finally {
    process.removeAllListeners("uncaughtException");
    for (const fn of original) process.on("uncaughtException", fn);
  }
  assert.deepEqual(t.log, [["event", "orders", 1], ["event", "orders", 2]]);
  assert.deepEqual(thrown, ["page bug", "page bug"]);
  t.client.close();
});

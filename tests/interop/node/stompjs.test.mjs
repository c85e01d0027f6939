// @stomp/stompjs (the browser STOMP client) over Web-STOMP, in Node with the `ws` package.
import test from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Client } from "@stomp/stompjs";

Object.assign(globalThis, { WebSocket });
const url = process.env.WEB_STOMP_URL;

function connect() {
  return new Promise((resolve, reject) => {
    const c = new Client({
      brokerURL: url,
      connectHeaders: { login: "guest", passcode: "guest", host: "/" },
      reconnectDelay: 0,
      heartbeatIncoming: 1000,
      heartbeatOutgoing: 1000,
    });
    c.onConnect = (frame) => resolve([c, frame]);
    c.onStompError = (f) => reject(new Error(f.headers.message));
    c.onWebSocketError = () => reject(new Error("websocket error"));
    c.activate();
  });
}

test("stompjs connects with 1.2 and heart-beats", async () => {
  const [c, frame] = await connect();
  assert.equal(frame.headers.version, "1.2");
  assert.match(frame.headers.server, /^RabbitMQ\/\S+ Warren\//);
  await c.deactivate();
});

test("stompjs publishes and subscribes, with receipts and client acks", async () => {
  const [c] = await connect();
  const q = `/queue/stompjs-${Date.now()}`;
  const got = [];
  const done = new Promise((resolve) => {
    c.subscribe(q, (m) => {
      got.push(m.body);
      m.ack();
      if (got.length === 3) resolve();
    }, { ack: "client-individual" });
  });
  const receipt = new Promise((resolve) => c.watchForReceipt("r-1", resolve));
  c.publish({ destination: q, body: "one", headers: { receipt: "r-1", persistent: "true" } });
  await receipt;
  c.publish({ destination: q, body: "two" });
  c.publish({ destination: q, body: "three", headers: { "content-type": "text/plain" } });
  await done;
  assert.deepEqual(got, ["one", "two", "three"]);
  await c.deactivate();
});

test("stompjs binary bodies survive", async () => {
  const [c] = await connect();
  const dest = `/topic/bin-${Date.now()}`;
  const bytes = Uint8Array.from({ length: 256 }, (_, i) => i);
  const got = new Promise((resolve) => c.subscribe(dest, (m) => resolve(m.binaryBody)));
  await new Promise((r) => setTimeout(r, 100));
  c.publish({ destination: dest, binaryBody: bytes, headers: { "content-type": "application/octet-stream" } });
  assert.deepEqual(Array.from(await got), Array.from(bytes));
  await c.deactivate();
});

// mqtt.js over Web-MQTT (and over TCP), meeting STOMP subscribers through amq.topic.
import test from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import mqtt from "mqtt";
import { Client } from "@stomp/stompjs";

Object.assign(globalThis, { WebSocket });

function mqttConnect(url, opts = {}) {
  return new Promise((resolve, reject) => {
    const c = mqtt.connect(url, { reconnectPeriod: 0, connectTimeout: 5000, ...opts });
    c.once("connect", (ack) => resolve([c, ack]));
    c.once("error", reject);
  });
}

for (const [name, version] of [["3.1.1", 4], ["5.0", 5]]) {
  test(`mqtt.js ${name} over WebSocket: QoS 0/1/2 round trip`, async () => {
    const [c] = await mqttConnect(process.env.WEB_MQTT_URL, { protocolVersion: version, clientId: `js-${version}-${Date.now()}` });
    const topic = `js/${version}/${Date.now()}`;
    await c.subscribeAsync(topic, { qos: 2 });
    const got = [];
    const done = new Promise((resolve) => c.on("message", (t, payload, packet) => {
      got.push([t, payload.toString(), packet.qos]);
      if (got.length === 3) resolve();
    }));
    for (const qos of [0, 1, 2]) await c.publishAsync(topic, `q${qos}`, { qos });
    await done;
    got.sort((a, b) => a[2] - b[2]);
    assert.deepEqual(got, [[topic, "q0", 0], [topic, "q1", 1], [topic, "q2", 2]]);
    await c.endAsync();
  });
}

test("mqtt.js over WebSocket reaches a Web-STOMP subscriber", async () => {
  const stomp = await new Promise((resolve, reject) => {
    const s = new Client({ brokerURL: process.env.WEB_STOMP_URL, connectHeaders: { login: "guest", passcode: "guest", host: "/" }, reconnectDelay: 0 });
    s.onConnect = () => resolve(s);
    s.onStompError = (f) => reject(new Error(f.headers.message));
    s.activate();
  });
  const id = Date.now();
  const got = new Promise((resolve) => stomp.subscribe(`/topic/browser.${id}.#`, (m) => resolve(m)));
  await new Promise((r) => setTimeout(r, 100));
  const [c] = await mqttConnect(process.env.WEB_MQTT_URL, { protocolVersion: 5 });
  await c.publishAsync(`browser/${id}/x`, "hello stomp", { qos: 1, properties: { contentType: "text/plain", userProperties: { origin: "mqtt.js" } } });
  const m = await got;
  assert.equal(m.body, "hello stomp");
  assert.equal(m.headers.destination, `/topic/browser.${id}.x`);
  assert.equal(m.headers["content-type"], "text/plain");
  assert.equal(m.headers.origin, "mqtt.js");
  await c.endAsync();
  await stomp.deactivate();
});

// The live example end to end: the MQTT fleet simulator publishes, the page (served
// locally) subscribes over Web-STOMP in headless Chromium, and positions must show up.
import test from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const example = path.resolve(here, "../../../examples/live-vehicles");
const { startFleet } = await import(path.join(example, "simulator.js"));
const { serve } = await import(path.join(example, "serve.js"));

test("positions published over MQTT appear live in the browser", { timeout: 60_000 }, async () => {
  const server = await serve(0);
  const page_url = `http://127.0.0.1:${server.address().port}/?ws=${encodeURIComponent(process.env.WEB_STOMP_URL)}`;
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  let fleet;
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 640 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(page_url);
    await page.waitForSelector("#status.up", { timeout: 10_000 });
    fleet = startFleet({ url: process.env.MQTT_URL, vehicles: 6, interval: 200 });
    await fleet.ready;
    await page.waitForFunction(() => Number(document.getElementById("count").textContent) >= 60, null, { timeout: 20_000 });
    assert.equal(await page.locator("#vehicles").textContent(), "6");
    assert.equal(await page.locator("tbody tr").count(), 6);
    assert.equal(await page.locator("circle.dot").count(), 6);
    const first = await page.locator("tbody tr").first().textContent();
    assert.match(first, /truck-01/);
    if (process.env.SCREENSHOT) {
      await page.screenshot({ path: process.env.SCREENSHOT });
    }
    assert.deepEqual(errors, []);
  } finally {
    fleet?.stop();
    await browser.close();
    server.close();
  }
});

// The dashboard (served by the broker at /) in headless Chromium: log in as guest, create a
// queue through the page, publish to it from the queue's page, and see its message count
// change; then add a user, grant it permissions and delete it. The page talks only to the management API, so this also checks that the API
// answers what a browser sends (fetch with basic auth, JSON bodies).
import test from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const api = process.env.HTTP_API_URL;

test("dashboard: log in, create a queue, publish, see the count change, manage a user", { timeout: 60_000 }, async () => {
  assert.ok(api, "HTTP_API_URL must name the broker's management API");
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const queue = "dash-" + Math.random().toString(16).slice(2, 10);
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    const errors = [];
    page.on("pageerror", (e) => errors.push(String(e)));
    // The wrong password below is answered 401 on purpose; any other failed load is a bug.
    page.on("console", (m) => {
      if (m.type() === "error" && !/status of 401/.test(m.text())) errors.push(m.text());
    });
    // A wrong password keeps the login form up and says why.
    await page.goto(api + "/");
    await page.waitForSelector("#loginform", { state: "visible", timeout: 10_000 });
    await page.fill("#user", "guest");
    await page.fill("#pass", "wrong");
    await page.click("#loginbtn");
    await page.waitForFunction(() => /login|credentials|denied|authoris|authoriz/i.test(document.getElementById("err").textContent), null, { timeout: 10_000 });
    assert.equal(await page.locator("#login").isVisible(), true);

    await page.fill("#user", "guest");
    await page.fill("#pass", "guest");
    await page.click("#loginbtn");
    await page.waitForSelector("#who:has-text('guest')", { timeout: 10_000 });
    await page.waitForSelector(".card", { timeout: 10_000 });
    assert.equal(await page.locator("#login").isVisible(), false);

    await page.click("header a[data-view=queues]");
    await page.waitForSelector("#newq", { timeout: 10_000 });
    await page.fill("#newqname", queue);
    await page.click("#newqbtn");
    const link = page.locator(`a[data-name="${queue}"]`);
    await link.waitFor({ timeout: 10_000 });

    await link.click();
    await page.waitForSelector("#qcount", { timeout: 10_000 });
    assert.equal((await page.locator("#qcount").textContent()).trim(), "0");
    await page.fill("#pubbody", "hello from the dashboard");
    await page.click("#pubbtn");
    await page.waitForFunction(() => document.getElementById("qcount")?.textContent.trim() === "1", null, { timeout: 10_000 });
    await page.fill("#pubbody", "second");
    await page.click("#pubbtn");
    await page.waitForFunction(() => document.getElementById("qcount")?.textContent.trim() === "2", null, { timeout: 10_000 });

    // Get one message back (acked, not requeued): the count drops and the payload shows.
    await page.selectOption("#getmode", "ack_requeue_false");
    await page.click("#getbtn");
    await page.waitForSelector("#got pre", { timeout: 10_000 });
    assert.match(await page.locator("#got").textContent(), /hello from the dashboard/);
    await page.waitForFunction(() => document.getElementById("qcount")?.textContent.trim() === "1", null, { timeout: 10_000 });

    // The queues table shows the same count.
    await page.click("header a[data-view=queues]");
    const row = page.locator("tr", { has: page.locator(`a[data-name="${queue}"]`) });
    await row.waitFor({ timeout: 10_000 });
    const cells = await row.locator("td").allTextContents();
    assert.equal(cells[4], "1", `queue row: ${cells.join(" | ")}`);

    // Back on the queue's page: a screenshot of it when asked, then purge and delete.
    await link.click();
    await page.waitForSelector("#purge", { timeout: 10_000 });
    if (process.env.SCREENSHOT_DASHBOARD) {
      await page.screenshot({ path: process.env.SCREENSHOT_DASHBOARD, fullPage: true });
    }
    await page.click("#purge");
    await page.waitForFunction(() => document.getElementById("qcount")?.textContent.trim() === "0", null, { timeout: 10_000 });
    await page.click("#delq");
    await page.waitForSelector("#newq", { timeout: 10_000 });
    assert.equal(await page.locator(`a[data-name="${queue}"]`).count(), 0);

    // Users: add one with a tag, grant it permissions and a topic permission on its page,
    // then delete it (the page asks to confirm).
    const user = "dash-user-" + Math.random().toString(16).slice(2, 8);
    await page.click("header a[data-view=users]");
    await page.waitForSelector("#newu", { timeout: 10_000 });
    await page.fill("#newuname", user);
    await page.fill("#newupass", "secret");
    await page.fill("#newutags", "management");
    await page.click("#newubtn");
    const userRow = page.locator("tr", { has: page.locator(`a[data-perms="${user}"]`) });
    await userRow.waitFor({ timeout: 10_000 });
    assert.match((await userRow.locator("td").allTextContents()).join(" | "), /management/);
    await page.click(`a[data-perms="${user}"]`);
    await page.waitForSelector("#setperm", { timeout: 10_000 });
    assert.equal(await page.locator("#permuser").inputValue(), user);
    await page.fill("#permwrite", "^dash");
    await page.click("#permbtn");
    const permRow = page.locator("tr", { has: page.locator(`button[data-clearperm][data-user="${user}"]`) });
    await permRow.waitFor({ timeout: 10_000 });
    assert.match((await permRow.locator("td").allTextContents()).join(" | "), /\^dash/);
    await page.fill("#topicwrite", "^sensors\\.");
    await page.click("#topicbtn");
    await page.locator(`button[data-cleartopic][data-user="${user}"]`).waitFor({ timeout: 10_000 });
    const topic = await (await fetch(`${api}/api/topic-permissions/%2F/${user}`, {
      headers: { Authorization: "Basic " + Buffer.from("guest:guest").toString("base64") },
    })).json();
    assert.equal(topic[0].write, "^sensors\\.");
    page.once("dialog", (d) => d.accept());
    await page.click("header a[data-view=users]");
    await page.locator(`button[data-deluser="${user}"]`).click();
    await page.locator(`a[data-perms="${user}"]`).waitFor({ state: "detached", timeout: 10_000 });

    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
  }
});

// The /ui viewer end to end: the real camserve binary, Debian's headless Chromium driven by playwright-core.
// Uploads the fixture image with its red square at rows 32-63, cols 16-47 (tests/fixtures/README.md), waits
// for the overlay, checks the box drawn over it, and saves a screenshot under tests/artifacts/.
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const fixtures = path.join(root, "tests/fixtures");
const artifacts = path.join(root, "tests/artifacts");
const binary = process.env.CAMSERVE_BIN || path.join(root, "target/debug/camserve");
const ort = path.join(root, ".ort/onnxruntime/capi/libonnxruntime.so.1.31.1");

function startServer() {
  const dir = mkdtempSync(path.join(tmpdir(), "camserve-ui-"));
  const config = path.join(dir, "camserve.toml");
  writeFileSync(config, `[runtime]
library = "${ort}"
[[models]]
name = "red"
file = "${path.join(fixtures, "red_detector.onnx")}"
[[models]]
name = "tiny"
file = "${path.join(fixtures, "tiny_cnn.onnx")}"
`);
  const child = spawn(binary, ["serve", "--config", config, "--bind", "127.0.0.1:0"], { stdio: ["ignore", "ignore", "pipe"] });
  return new Promise((resolve, reject) => {
    let log = "";
    const timer = setTimeout(() => reject(new Error(`camserve did not start:\n${log}`)), 60_000);
    child.stderr.on("data", (chunk) => {
      log += chunk;
      const found = /serving.*?address\W+(127\.0\.0\.1:\d+)/.exec(log);
      if (found) {
        clearTimeout(timer);
        resolve({ child, base: `http://${found[1]}`, dir });
      }
    });
    child.on("exit", (code) => reject(new Error(`camserve exited with ${code}:\n${log}`)));
  });
}

const { child, base, dir } = await startServer();
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 1100 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${base}/ui`);

  // The models come from the server; every control has a label.
  await page.waitForSelector("#model option[value=red]", { state: "attached" });
  await page.selectOption("#model", "red");
  assert.deepEqual(await page.$$eval("#method option", (os) => os.map((o) => o.value)),
    ["gradcam", "gradcampp", "xgradcam", "hirescam", "gradcam_elementwise", "layercam", "eigencam", "eigengradcam",
      "scorecam"]);
  const unlabelled = await page.$$eval("input, select", (controls) =>
    controls.filter((c) => c.type !== "hidden" && c.labels.length === 0).map((c) => c.id));
  assert.deepEqual(unlabelled, [], "controls without a label");

  // The red class by name, threshold 0.5: the box is the square exactly (see tests/it/dashboards.rs).
  await page.setInputFiles("#image", path.join(fixtures, "images/red_blue_128.png"));
  await page.fill("#classes", "red");
  await page.check("#by-name");
  await page.fill("#threshold", "0.5");
  await page.press("#threshold", "Enter"); // the keyboard submits the form
  await page.waitForSelector("#target-0 img.overlay", { timeout: 30_000 });
  await page.waitForFunction(() => document.querySelector("#target-0 img.overlay").complete);

  const heading = await page.textContent("#target-0 h3");
  assert.match(heading, /^red \(class 0\): \d+\.\d\d %$/);
  const rects = await page.$$eval("#target-0 svg.boxes rect", (rs) =>
    rs.map((r) => ["x", "y", "width", "height"].map((a) => Number(r.getAttribute(a)))));
  assert.deepEqual(rects, [[16, 32, 32, 32]], "one box, on the red square");

  // On screen: the box sits over the square, wherever and however large the overlay is drawn.
  const [image, rect] = await Promise.all([
    page.locator("#target-0 img.overlay").boundingBox(),
    page.locator("#target-0 svg.boxes rect").boundingBox(),
  ]);
  const scale = image.width / 128;
  assert.ok(Math.abs(image.height / 128 - scale) < 0.01, "the overlay keeps the image's aspect");
  const inImage = [(rect.x - image.x) / scale, (rect.y - image.y) / scale, rect.width / scale, rect.height / scale];
  inImage.forEach((v, i) => assert.ok(Math.abs(v - [16, 32, 32, 32][i]) <= 1.5, `box on screen ${inImage}`));

  // The overlay is drawn hot (red in JET) over the square's centre and cold far from it.
  const [centre, corner] = await page.$eval("#target-0 img.overlay", (img) => {
    const canvas = document.createElement("canvas");
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    return [Array.from(ctx.getImageData(32, 48, 1, 1).data), Array.from(ctx.getImageData(100, 10, 1, 1).data)];
  });
  assert.ok(centre[0] > centre[2], `centre ${centre} is not hot`);
  assert.ok(corner[2] > corner[0], `corner ${corner} is not cold`);

  // Probabilities, the trust score (the API's own figures for the same request) and the downloads.
  const rows = await page.$$eval("#predictions tbody tr", (trs) => trs.map((tr) => tr.cells[1].textContent));
  assert.deepEqual(rows.sort(), ["blue", "red"]);
  const api = await (await fetch(`${base}/v1/models/red/explain?class=red&trust=true&output=boxes`, {
    method: "POST", headers: { "content-type": "image/png" }, body: readFileSync(path.join(fixtures, "images/red_blue_128.png")),
  })).json();
  const trust = api.explanations[0].trust;
  const percent = (p) => `${(100 * p).toFixed(2)} %`;
  assert.deepEqual(await page.$$eval("#trust-score li", (lis) => lis.map((li) => li.textContent)),
    [`red: ${percent(trust.probability)} on the image, ${percent(trust.kept_probability)} kept, `
      + `${percent(trust.removed_probability)} removed`]);
  assert.ok(trust.kept_probability > trust.removed_probability, `the red map is not trustworthy: ${JSON.stringify(trust)}`);
  const downloads = await page.$$eval("#target-0 .downloads a", (as) => as.map((a) => a.download));
  assert.deepEqual(downloads, ["red-0-red-overlay.png", "red-0-red-heatmap.png", "red-0-red-boxes.json", "red-0-red-map.json"]);
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("button[data-format=coco]")]);
  assert.equal(download.suggestedFilename(), "red-coco.json");

  // The same image dropped on the drop zone replaces the chosen file.
  const dropped = await page.evaluateHandle(async (b64) => {
    const transfer = new DataTransfer();
    const blob = await (await fetch(`data:image/png;base64,${b64}`)).blob();
    transfer.items.add(new File([blob], "dropped.png", { type: "image/png" }));
    return transfer;
  }, readFileSync(path.join(fixtures, "images/red_blue_128.png")).toString("base64"));
  await page.dispatchEvent("#drop-zone", "drop", { dataTransfer: dropped });
  assert.equal(await page.textContent("#file-name"), "dropped.png (404 bytes)");

  // The model's two best classes: a card each, blue (the larger square, rows 80-111, cols 72-119) first.
  await page.check("#by-top-k");
  await page.fill("#top-k", "2");
  await page.click("#explain");
  await page.waitForSelector("#target-1 img.overlay");
  const cards = await page.$$eval("#targets .target", (sections) => sections.map((s) => [
    s.querySelector("h3").textContent.split(" ")[0],
    Array.from(s.querySelectorAll("svg.boxes rect")).map((r) =>
      ["x", "y", "width", "height"].map((a) => Number(r.getAttribute(a)))),
  ]));
  assert.deepEqual(cards, [["blue", [[72, 80, 48, 32]]], ["red", [[16, 32, 32, 32]]]]);

  // A class the model does not have: the server's message is shown, not a blank page.
  await page.fill("#classes", "green");
  await page.check("#by-name");
  await page.click("#explain");
  await page.waitForSelector("#status.error");
  assert.match(await page.textContent("#status"), /no class is labelled `green`.*\(class_out_of_range\)/);
  await page.fill("#classes", "red");
  await page.fill("#top-k", "1");
  await page.check("#by-name");
  await page.click("#explain");
  await page.waitForFunction(() => document.querySelector("#status").textContent.startsWith("Explained"));

  assert.deepEqual(errors, [], "script errors on the page");
  mkdirSync(artifacts, { recursive: true });
  await page.screenshot({ path: path.join(artifacts, "viewer.png"), fullPage: true });
  console.log(`ok: viewer shows the box [16, 32, 32, 32]; screenshot in ${path.relative(root, artifacts)}/viewer.png`);
} catch (e) {
  failed = true;
  console.error(e);
  mkdirSync(artifacts, { recursive: true });
  const page = browser.contexts()[0]?.pages()[0];
  if (page) await page.screenshot({ path: path.join(artifacts, "viewer-failure.png"), fullPage: true }).catch(() => {});
} finally {
  await browser.close();
  child.kill("SIGTERM");
  rmSync(dir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);

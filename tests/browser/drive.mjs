// Drives Debian's Chromium (through playwright-core, no browser download) against a running ComfyUI
// server for tests/test_browser.py:
//   node tests/browser/drive.mjs <config.json>
// config: { url, workflow (UI format), user_data_dir, out_dir, executable, timeout_s }
// Loads the UI workflow with app.loadGraphData, reads back app.graphToPrompt(), queues it with
// app.queuePrompt(0), waits for the prompt in /history, then reads the pack's DOM panels and takes
// screenshots. Prints one JSON object (the result) on stdout; diagnostics go to stderr.
import { readFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const cfg = JSON.parse(readFileSync(process.argv[2], "utf8"));
const log = (...a) => console.error("[drive]", ...a);
const guard = setTimeout(() => { log(`gave up after ${cfg.timeout_s}s`); process.exit(3); }, cfg.timeout_s * 1000);
mkdirSync(cfg.out_dir, { recursive: true });

const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];

const result = { console_errors: [], page_errors: [], failed_requests: [], screenshots: {} };
const context = await chromium.launchPersistentContext(cfg.user_data_dir, {
  executablePath: cfg.executable, headless: true, args: ARGS, viewport: { width: 1800, height: 1000 },
});
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("console", (m) => { if (m.type() === "error") result.console_errors.push(m.text()); });
  page.on("pageerror", (e) => result.page_errors.push(String(e?.stack || e)));
  page.on("response", (r) => { if (r.status() >= 400) result.failed_requests.push(`${r.status()} ${r.url()}`); });

  const t0 = Date.now();
  await page.goto(cfg.url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => {
    const app = window.comfyAPI?.app?.app;
    return app?.graph && app.canvas && (app.extensions || []).some((e) => e.name === "prolora.transfer");
  }, null, { timeout: 90_000, polling: 250 });
  log(`frontend ready in ${Date.now() - t0} ms`);
  await page.waitForTimeout(500);
  await page.keyboard.press("Escape"); // the templates dialog, if it opened
  await page.keyboard.press("Escape");
  result.extensions_in_app = await page.evaluate(() => window.comfyAPI.app.app.extensions.filter((e) => e.name === "prolora.transfer").length);

  await page.evaluate(async (wf) => {
    const app = window.comfyAPI.app.app;
    await app.loadGraphData(wf, true, true, null, { showMissingNodesDialog: false, showMissingModelsDialog: false });
  }, cfg.workflow);
  await page.keyboard.press("Escape");
  result.prompt = await page.evaluate(async () => (await window.comfyAPI.app.app.graphToPrompt()).output);
  result.loaded_types = await page.evaluate(() => window.comfyAPI.app.app.graph.nodes.map((n) => n.type));

  const before = await page.evaluate(async () => Object.keys(await (await window.comfyAPI.api.api.fetchApi("/history")).json()));
  await page.evaluate(async () => { await window.comfyAPI.app.app.queuePrompt(0); });
  const t1 = Date.now();
  let done = null;
  while (!done) {
    if (Date.now() - t1 > (cfg.prompt_timeout_s ?? 120) * 1000) throw new Error(`the prompt did not finish within ${cfg.prompt_timeout_s ?? 120} s`);
    done = await page.evaluate(async (known) => {
      const hist = await (await window.comfyAPI.api.api.fetchApi("/history")).json();
      const id = Object.keys(hist).find((k) => !known.includes(k) && hist[k].status?.completed !== undefined);
      return id ? { id, status: hist[id].status.status_str } : null;
    }, before);
    if (!done) await page.waitForTimeout(300);
  }
  Object.assign(result, { prompt_id: done.id, status: done.status });
  log(`prompt ${result.prompt_id} ${result.status} in ${Date.now() - t1} ms`);

  // the Match Modules panel
  const match = page.locator('[data-prolora="prolora_match_report"]').first();
  await match.locator('[data-field="passing"]').waitFor({ timeout: 30_000 });
  const matchCount = await page.locator('[data-prolora="prolora_match_report"] [data-field="passing"]').count();
  if (matchCount < (cfg.match_panels ?? 1)) {
    await page.waitForFunction((n) => document.querySelectorAll('[data-prolora="prolora_match_report"] [data-field="passing"]').length >= n,
      cfg.match_panels, { timeout: 30_000 });
  }
  // every Match Modules panel, by node id (the first one is also reported alone below)
  result.match_panels = await page.$$eval('[data-prolora="prolora_match_report"]', (els) => Object.fromEntries(els.map((el) => {
    const f = (name) => el.querySelector(`[data-field="${name}"]`)?.textContent;
    return [el.dataset.node, { passing: f("passing"), modules: f("modules"), threshold: f("threshold"), skipped: f("skipped"),
      rows: el.querySelectorAll("tbody tr").length }];
  })));
  result.match_panel = await match.evaluate((el) => {
    const f = (name) => el.querySelector(`[data-field="${name}"]`)?.textContent;
    const rect = el.getBoundingClientRect();
    return {
      passing: f("passing"), modules: f("modules"), threshold: f("threshold"), skipped: f("skipped"), pairing: f("pairing"),
      lora_modules: f("lora_modules"),
      groups: Object.fromEntries([...el.querySelectorAll("[data-group]")].map((g) => [g.dataset.group, Number(g.querySelector("b").textContent)])),
      strip_cells: el.querySelectorAll(".prolora-strip .cell").length,
      strip_blocks: [...el.querySelectorAll(".prolora-strip .cell")].map((c) => c.dataset.block),
      strip_gaps: el.querySelectorAll(".prolora-strip .sep").length,
      rows: [...el.querySelectorAll("tbody tr")].map((tr) => ({ source: tr.dataset.source, cls: tr.className,
        status: tr.querySelector(".status").textContent })),
      visible: rect.width > 50 && rect.height > 50 && getComputedStyle(el).visibility !== "hidden", width: rect.width, height: rect.height,
    };
  });

  // the Compare panel: both images loaded, then move the slider
  const cmp = page.locator('[data-prolora="prolora_compare_view"]').first();
  await cmp.locator(".prolora-stage img").first().waitFor({ timeout: 30_000 });
  await page.waitForFunction(() => { // the first Compare panel's images (a workflow may hold several)
    const imgs = document.querySelector('[data-prolora="prolora_compare_view"]').querySelectorAll(".prolora-stage img");
    return imgs.length === 2 && [...imgs].every((i) => i.complete && i.naturalWidth > 0);
  }, null, { timeout: 30_000 });
  await cmp.locator('[data-field="slider"]').evaluate((s) => { s.value = "25"; s.dispatchEvent(new Event("input", { bubbles: true })); });
  result.compare_panel = await cmp.evaluate((el) => {
    const imgs = [...el.querySelectorAll(".prolora-stage img")];
    const sel = (name) => el.querySelector(`[data-field="${name}"]`);
    return {
      options: [...sel("a").options].map((o) => o.textContent), left: sel("a").selectedOptions[0]?.textContent,
      right: sel("b").selectedOptions[0]?.textContent, distance: sel("distance").textContent,
      images: imgs.map((i) => ({ src: i.getAttribute("src"), w: i.naturalWidth, h: i.naturalHeight })),
      clip: imgs[1].style.clipPath, tags: [...el.querySelectorAll(".tag")].map((t) => t.textContent),
    };
  });

  await page.waitForTimeout(800); // let the canvas draw the previews
  const shot = (name) => join(cfg.out_dir, name);
  await page.screenshot({ path: shot("browser_workflow.png") });
  await match.screenshot({ path: shot("browser_match_panel.png") });
  await cmp.screenshot({ path: shot("browser_compare_panel.png") });
  result.screenshots = { page: shot("browser_workflow.png"), match: shot("browser_match_panel.png"), compare: shot("browser_compare_panel.png") };
} catch (e) {
  result.error = String(e?.stack || e);
  try {
    const page = context.pages()[0];
    if (page) { await page.screenshot({ path: join(cfg.out_dir, "browser_failure.png") }); result.screenshots.failure = join(cfg.out_dir, "browser_failure.png"); }
  } catch { /* ignore */ }
} finally {
  await context.close();
  clearTimeout(guard);
}
writeFileSync(join(cfg.out_dir, "browser_result.json"), JSON.stringify(result, null, 1));
process.stdout.write(JSON.stringify(result) + "\n");

// Open a study in the prebuilt OHIF viewer as a radiologist would, and report what OHIF shows.
//
// Reads a JSON spec on stdin:
//   {
//     "chromium": "/usr/bin/chromium",
//     "url": "http://127.0.0.1:PORT/ohif/viewer?StudyInstanceUIDs=...",
//     "name": "mr",                       // screenshot file prefix
//     "screenshotDir": "/abs/test-artifacts/ohif",
//     "timeoutMs": 60000,                 // per wait
//     "steps": [{"kind": "seg", "seriesNumber": 9011}, {"kind": "sr", "seriesNumber": 9012}]
//   }
// For each step it double-clicks the series thumbnail in the study browser, accepts
// OHIF's "load/track?" prompt, and waits until OHIF's own services hold the result
// (segmentationService for a SEG, measurementService for an SR). Screenshots go to
// screenshotDir; progress goes to stderr; the last stdout line is a JSON summary:
//   { ok, error, steps: [...], segmentations: [...], measurements: [...],
//     displaySets: [...], console: [...], pageErrors: [...], httpErrors: [...], screenshots: [...] }
// Exit code 0 when every step reached its result, 1 otherwise (the summary says why).

import { mkdirSync, readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const spec = JSON.parse(readFileSync(0, 'utf8'));
const timeout = spec.timeoutMs ?? 60000;
const log = (...args) => console.error(`[ohif_check ${new Date().toISOString().slice(11, 23)}]`, ...args);

const summary = {
  ok: false,
  error: null,
  ohifUrl: spec.url,
  steps: [],
  segmentations: [],
  measurements: [],
  displaySets: [],
  viewports: [],
  console: [],
  pageErrors: [],
  httpErrors: [],
  screenshots: [],
};

// Console lines worth reporting: OHIF's SR/SEG loaders log why they skip content.
const INTERESTING = /rehydrat|measurement|segment|\bSR\b|\bSEG\b|SCOORD|dicom-sr|tracking|hydrat|colou?r|CIELab|error|warn/i;

const userDataDir = mkdtempSync(join(tmpdir(), 'cradle-chromium-'));
let browser;

async function shot(page, label) {
  mkdirSync(spec.screenshotDir, { recursive: true });
  const path = join(spec.screenshotDir, `${spec.name}-${label}.png`);
  await page.screenshot({ path });
  summary.screenshots.push(path);
  log('screenshot', path);
  return path;
}

async function clickIfVisible(page, selector, waitMs) {
  const locator = page.locator(selector).first();
  try {
    await locator.waitFor({ state: 'visible', timeout: waitMs });
  } catch {
    return false;
  }
  await locator.click();
  return true;
}

// Everything the summary reports, read from OHIF's services (window.services is set by
// the cornerstone extension's init) and cornerstone's rendering engines.
function readState() {
  const services = window.services;
  if (!services) {
    return null;
  }
  const { segmentationService, measurementService, displaySetService, viewportGridService } = services;
  const viewportIds = [];
  try {
    const grid = viewportGridService.getState();
    for (const [id] of grid.viewports) {
      viewportIds.push(id);
    }
  } catch {
    /* grid not ready */
  }
  const colorOf = (segmentationId, segmentIndex) => {
    for (const viewportId of viewportIds) {
      try {
        const color = segmentationService.getSegmentColor(viewportId, segmentationId, segmentIndex);
        if (color) {
          return Array.from(color);
        }
      } catch {
        /* not shown in this viewport */
      }
    }
    return null;
  };
  const segmentations = (segmentationService?.getSegmentations() ?? []).map(seg => ({
    segmentationId: seg.segmentationId,
    label: seg.label,
    segments: Object.values(seg.segments ?? {})
      .filter(Boolean)
      .map(s => ({
        segmentIndex: s.segmentIndex,
        label: s.label,
        color: colorOf(seg.segmentationId, s.segmentIndex),
        cachedStats: s.cachedStats ? Object.keys(s.cachedStats) : [],
      })),
    representations: viewportIds.flatMap(viewportId => {
      try {
        return (segmentationService.getSegmentationRepresentations(viewportId, {
          segmentationId: seg.segmentationId,
        }) ?? []).map(r => ({ viewportId, type: r.type, visible: r.visible }));
      } catch {
        return [];
      }
    }),
  }));
  const text = t => (Array.isArray(t) ? t.filter(Boolean).map(String) : t ? [String(t)] : []);
  const measurements = (measurementService?.getMeasurements() ?? []).map(m => ({
    uid: m.uid,
    label: m.label,
    toolName: m.toolName,
    displayText: { primary: text(m.displayText?.primary), secondary: text(m.displayText?.secondary) },
    referenceSeriesUID: m.referenceSeriesUID,
    referencedImageId: m.referencedImageId ? String(m.referencedImageId).slice(-80) : null,
    points: Array.isArray(m.points) ? m.points.length : null,
    source: m.source ? `${m.source.name} ${m.source.version ?? ''}`.trim() : null,
  }));
  const displaySets = (displaySetService?.getActiveDisplaySets() ?? []).map(ds => ({
    Modality: ds.Modality,
    SeriesNumber: ds.SeriesNumber,
    SeriesDescription: ds.SeriesDescription,
    SeriesInstanceUID: ds.SeriesInstanceUID,
    isLoaded: ds.isLoaded ?? null,
    isHydrated: ds.isHydrated ?? null,
    isRehydratable: ds.isRehydratable ?? null,
    numImages: ds.numImageFrames ?? ds.instances?.length ?? null,
    srMeasurements: Array.isArray(ds.measurements) ? ds.measurements.length : null,
    segments: ds.segments ? Object.keys(ds.segments).length : null,
  }));
  const viewports = [];
  try {
    for (const engine of window.cornerstone.getRenderingEngines()) {
      for (const vp of engine.getViewports()) {
        viewports.push({ id: vp.id, type: vp.type, status: vp.viewportStatus ?? null,
                         imageIndex: vp.getCurrentImageIdIndex?.() ?? null });
      }
    }
  } catch {
    /* cornerstone not ready */
  }
  return { segmentations, measurements, displaySets, viewports };
}

async function state(page) {
  return (await page.evaluate(readState)) ?? { segmentations: [], measurements: [], displaySets: [], viewports: [] };
}

async function waitForViewerReady(page) {
  await page.waitForFunction(() => Boolean(window.services?.displaySetService), null, { timeout });
  await page.locator('[data-cy^="study-browser-thumbnail"]').first().waitFor({ state: 'visible', timeout });
  // The first image is on screen: every cornerstone viewport has rendered.
  await page.waitForFunction(
    () => {
      const engines = window.cornerstone?.getRenderingEngines?.() ?? [];
      const viewports = engines.flatMap(e => e.getViewports());
      return viewports.length > 0 && viewports.every(v => v.viewportStatus === 'rendered');
    },
    null,
    { timeout }
  );
}

async function waitForSettled(page) {
  try {
    await page.waitForLoadState('networkidle', { timeout: 15000 });
  } catch {
    /* long-polling is fine */
  }
  await page.waitForTimeout(1000);
}

async function openSeries(page, step, index) {
  const record = { ...step, thumbnail: false, prompt: false, trackingPrompt: false, reached: false, ms: 0 };
  summary.steps.push(record);
  const started = Date.now();
  const thumb = page.locator(`[data-cy^="study-browser-thumbnail"][data-series="${step.seriesNumber}"]`).first();
  await thumb.waitFor({ state: 'visible', timeout });
  record.thumbnail = true;
  log(`step ${index}: double-click ${step.kind} series ${step.seriesNumber}`);
  await thumb.dblclick();
  // OHIF asks in the viewport whether to load (SEG) or track (SR) the object.
  record.prompt = await clickIfVisible(page, '[data-cy="yes-hydrate-btn"]', timeout);
  log(`step ${index}: hydrate prompt ${record.prompt ? 'accepted' : 'not shown'}`);
  if (step.kind === 'sr') {
    // The longitudinal mode may then ask to start tracking measurements for the series.
    record.trackingPrompt = await clickIfVisible(page, '[data-cy="prompt-begin-tracking-yes-btn"]', 5000);
  }
  const predicate =
    step.kind === 'seg'
      ? () => (window.services?.segmentationService?.getSegmentations() ?? []).length > 0
      : () => (window.services?.measurementService?.getMeasurements() ?? []).length > 0;
  try {
    await page.waitForFunction(predicate, null, { timeout });
    record.reached = true;
  } catch {
    record.reached = false;
  }
  await waitForSettled(page);
  record.ms = Date.now() - started;
  log(`step ${index}: ${step.kind} ${record.reached ? 'loaded' : 'NOT loaded'} in ${record.ms} ms`);
  await shot(page, `${String(index + 2).padStart(2, '0')}-${step.kind}`);
  return record.reached;
}

async function main() {
  // A fresh profile each run (--user-data-dir), as the machine's Chromium notes advise.
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: spec.chromium,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      // WebGL through SwiftShader (software): cornerstone3D renders with WebGL.
      '--use-angle=swiftshader',
      '--enable-unsafe-swiftshader',
      '--ignore-gpu-blocklist',
    ],
    viewport: { width: 1600, height: 1000 },
  });
  browser = context;
  // No onboarding tour on a fresh profile.
  await context.addInitScript(() => {
    try {
      localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
    } catch {
      /* opaque origin */
    }
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', msg => {
    const line = msg.text();
    if (INTERESTING.test(line) && summary.console.length < 400) {
      summary.console.push(`${msg.type()}: ${line.slice(0, 500)}`);
    }
  });
  page.on('pageerror', err => summary.pageErrors.push(String(err).slice(0, 500)));
  page.on('response', res => {
    if (res.status() >= 400 && summary.httpErrors.length < 50) {
      summary.httpErrors.push(`${res.status()} ${res.request().method()} ${res.url().slice(0, 200)}`);
    }
  });
  page.on('requestfailed', req => {
    if (summary.httpErrors.length < 50) {
      summary.httpErrors.push(`FAILED ${req.method()} ${req.url().slice(0, 200)} ${req.failure()?.errorText ?? ''}`);
    }
  });

  log('open', spec.url);
  await page.goto(spec.url, { waitUntil: 'domcontentloaded', timeout });
  try {
    await waitForViewerReady(page);
  } finally {
    await shot(page, '01-opened');
  }
  summary.webgl = await page.evaluate(() => {
    const gl = document.createElement('canvas').getContext('webgl2');
    return gl ? gl.getParameter(gl.RENDERER) : null;
  });

  let allReached = true;
  for (const [index, step] of spec.steps.entries()) {
    allReached = (await openSeries(page, step, index)) && allReached;
  }

  // Jump to the first measurement (its slice) by clicking its row in the panel.
  const row = page.locator('[data-cy="data-row"]').first();
  if (await row.isVisible().catch(() => false)) {
    await row.click();
    await waitForSettled(page);
  }
  await shot(page, 'final');
  Object.assign(summary, await state(page));
  summary.ok = allReached;
}

try {
  await main();
} catch (err) {
  summary.error = String(err?.stack ?? err).slice(0, 2000);
  log('error', summary.error);
} finally {
  if (browser) {
    await browser.close().catch(() => {});
  }
  rmSync(userDataDir, { recursive: true, force: true });
}
process.stdout.write(`${JSON.stringify(summary)}\n`);
process.exitCode = summary.ok ? 0 : 1;

// Open a study in the prebuilt OHIF viewer as a radiologist would, and report what OHIF shows.
//
// Reads a JSON spec on stdin:
//   {
//     "chromium": "/usr/bin/chromium",
//     "url": "http://127.0.0.1:PORT/ohif/viewer?StudyInstanceUIDs=...",
//     "name": "mr",                       // screenshot file prefix
//     "screenshotDir": "/abs/test-artifacts/ohif",
//     "timeoutMs": 60000,                 // per wait
//     "steps": [{"kind": "seg", "seriesNumber": 9011, "expectText": ["Left lung"]},
//               {"kind": "sr", "seriesNumber": 9012, "expectText": ["Volume"],
//                "layout": {"numRows": 1, "numCols": 2}, "viewportIndex": 1,
//                "alignSlices": true, "collapsePanels": ["left"]}]
//   }
// Optional per step: "layout" switches OHIF's viewport grid first (keeping what is
// shown), "viewportIndex" makes that viewport active so the series opens there,
// "alignSlices" then shows the step's slice in every viewport of the same series
// (e.g. the SEG beside the SR's outline), "collapsePanels" closes side panels
// ("left", "right") before the screenshot, giving the images more room.
// For each step it double-clicks the series thumbnail in the study browser, as a
// radiologist would, and then:
//   - SEG: accepts OHIF's "load the segmentation?" prompt in the viewport and waits until
//     segmentationService lists it; opens the segment panel and shows the middle slice;
//   - SR:  waits until OHIF's SR handler has parsed the report; if OHIF offers to track
//     it ("rehydratable": content it can turn into editable measurements) accepts that
//     prompt, else OHIF draws the regions read-only in the SR viewport; waits until
//     regions are placed on images (SR display set) or measurementService tracks them.
// Screenshots go to screenshotDir; progress goes to stderr; the last stdout line is a
// JSON summary: { ok, error, webgl, steps: [{..., reached, prompt, errorBoundary, labelled, drawn,
// textVisible, state: {segmentations, measurements, displaySets, srDisplaySets,
// annotations, overlayText, viewports, buttons}}], console, pageErrors, httpErrors,
// screenshots, ...final state }. The caller (tests/test_ohif.py) asserts on it.
// Exit code 0 when every step reached its result, 1 otherwise.

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
// Resolved by the console handler when OHIF logs its error boundary: a wait for an SR's
// regions stops there rather than at its timeout.
let boundaryLogged = null;
const errorBoundaryLogged = fromLine => new Promise(resolve => {
  boundaryLogged = resolve;
  if (summary.console.slice(fromLine).some(line => /Error Boundary/.test(line))) {
    resolve();
  }
});

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
  // SR display sets: what OHIF's SR handler parsed, and which groups it placed on an image.
  const srDisplaySets = (displaySetService?.getActiveDisplaySets() ?? [])
    .filter(ds => ds.Modality === 'SR')
    .map(ds => ({
      SeriesNumber: ds.SeriesNumber,
      isRehydratable: ds.isRehydratable ?? null,
      isHydrated: ds.isHydrated ?? null,
      measurements: (ds.measurements ?? []).map(m => ({
        TrackingIdentifier: m.TrackingIdentifier,
        loaded: m.loaded,
        placedOn: m.displaySetInstanceUID ? true : false,
        graphicType: m.graphicType ?? m.coords?.[0]?.GraphicType ?? null,
        graphicCode: m.graphicCode ?? null,
        pointsLength: m.pointsLength ?? null,
        coords: (m.coords ?? []).length,
        labels: (m.labels ?? []).map(l => `${l.label}: ${l.value}`.trim()),
      })),
    }));
  // Annotations cornerstone holds (hydrated tools and OHIF's read-only SR display tool).
  const annotations = [];
  try {
    for (const a of window.cornerstoneTools.annotation.state.getAllAnnotations()) {
      annotations.push({
        toolName: a.metadata?.toolName,
        label: a.data?.label ?? null,
        isPreview: a.isPreview ?? null,
        referencedImageId: a.metadata?.referencedImageId ? String(a.metadata.referencedImageId).slice(-60) : null,
      });
    }
  } catch {
    /* tools not ready */
  }
  // Text drawn over the viewports (annotation labels are SVG text).
  const overlayText = Array.from(document.querySelectorAll('[data-cy="viewport-pane"] svg text, .viewport-element svg text'))
    .map(t => t.textContent.trim())
    .filter(Boolean);
  const buttons = Array.from(document.querySelectorAll('[data-cy$="-btn"]')).map(b => b.getAttribute('data-cy'));
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
  return { segmentations, measurements, displaySets, srDisplaySets, annotations, overlayText: [...new Set(overlayText)], viewports, buttons: [...new Set(buttons)] };
}

async function state(page) {
  return (await page.evaluate(readState)) ?? {};
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

// The SR/SEG display set OHIF made of a series, by series number (null until it exists).
function displaySetInfo(seriesNumber) {
  const ds = (window.services?.displaySetService?.getActiveDisplaySets() ?? []).find(
    d => Number(d.SeriesNumber) === Number(seriesNumber)
  );
  if (!ds) {
    return null;
  }
  return {
    isLoaded: Boolean(ds.isLoaded),
    isRehydratable: ds.isRehydratable ?? null,
    isHydrated: ds.isHydrated ?? null,
    placed: (ds.measurements ?? []).filter(m => m.loaded === true).length,
  };
}

// Show the active viewport's slice in every other stack viewport of the same series;
// returns how many viewports were moved.
function alignSlicesWithActiveViewport() {
  const activeId = window.services.viewportGridService.getActiveViewportId();
  const viewports = window.cornerstone.getRenderingEngines().flatMap(e => e.getViewports());
  const active = viewports.find(v => v.id === activeId);
  const imageIds = active?.getImageIds?.() ?? [];
  const index = active?.getCurrentImageIdIndex?.();
  let moved = 0;
  for (const viewport of viewports) {
    const ids = viewport.getImageIds?.() ?? [];
    if (viewport !== active && ids.length === imageIds.length && ids[0] === imageIds[0]) {
      viewport.setImageIdIndex(index);
      moved += 1;
    }
  }
  return moved;
}

// OHIF's error boundary: "Something went wrong" on the page, or (when the failing component
// is the viewport, which then stays black) only its console line "... Error Boundary <error>",
// logged since console line `fromLine`.
async function errorBoundaryText(page, fromLine = 0) {
  const text = await page.locator('body').innerText().catch(() => '');
  if (/Something went wrong/.test(text)) {
    return 'Something went wrong';
  }
  const logged = summary.console.slice(fromLine).find(line => /Error Boundary/.test(line));
  return logged ? logged.split('\n')[0] : null;
}

// Whether OHIF placed an SR measurement with a label (a NUM or finding site) to draw.
function placedWithLabels(seriesNumber) {
  const ds = (window.services?.displaySetService?.getActiveDisplaySets() ?? []).find(
    d => Number(d.SeriesNumber) === Number(seriesNumber)
  );
  return (ds?.measurements ?? []).some(m => m.loaded === true && (m.labels ?? []).length > 0);
}

async function openSeries(page, step, index) {
  const record = { ...step, thumbnail: false, prompt: false, trackingPrompt: false, reached: false, ms: 0 };
  summary.steps.push(record);
  const firstConsoleLine = summary.console.length;
  const started = Date.now();
  const thumb = page.locator(`[data-cy^="study-browser-thumbnail"][data-series="${step.seriesNumber}"]`).first();
  await thumb.waitFor({ state: 'visible', timeout });
  record.thumbnail = true;
  if (step.layout) {
    log(`step ${index}: layout ${step.layout.numRows}x${step.layout.numCols}`);
    await page.evaluate(layout => window.commandsManager.runCommand('setViewportGridLayout', layout), step.layout);
    await page.locator('[data-cy="viewport-pane"]').nth((step.layout.numRows * step.layout.numCols) - 1)
      .waitFor({ state: 'visible', timeout });
  }
  if (step.viewportIndex !== undefined) {
    await page.locator('[data-cy="viewport-pane"]').nth(step.viewportIndex).click();
  }
  log(`step ${index}: double-click ${step.kind} series ${step.seriesNumber}`);
  await thumb.dblclick();
  if (step.kind === 'seg') {
    // OHIF asks in the viewport whether to load the segmentation.
    record.prompt = await clickIfVisible(page, '[data-cy="yes-hydrate-btn"]', timeout);
    try {
      await page.waitForFunction(
        () => (window.services?.segmentationService?.getSegmentations() ?? []).length > 0,
        null,
        { timeout }
      );
      record.reached = true;
    } catch {
      record.reached = false;
    }
    // Show the segment list (right panel) and a slice through the middle of the lungs.
    await clickIfVisible(page, '[data-cy="panelSegmentation-btn"]', 3000);
    await page.evaluate(() => {
      const viewport = window.cornerstone?.getRenderingEngines?.()[0]?.getViewports?.()[0];
      const n = viewport?.getImageIds?.().length ?? 0;
      if (n > 1) {
        viewport.setImageIdIndex(Math.floor(n / 2));
      }
    });
  } else {
    // The SR handler parses the report; OHIF asks to track it only when it can turn
    // its content into editable measurements ("rehydratable"); otherwise it draws the
    // regions read-only in the SR viewport.
    try {
      await page.waitForFunction(displaySetInfo, step.seriesNumber, { timeout });
    } catch {
      /* reported below */
    }
    let info = await page.evaluate(displaySetInfo, step.seriesNumber);
    if (info?.isRehydratable) {
      record.prompt = await clickIfVisible(page, '[data-cy="yes-hydrate-btn"]', timeout);
      record.trackingPrompt = await clickIfVisible(page, '[data-cy="prompt-begin-tracking-yes-btn"]', 5000);
    }
    // Placed (or tracked), OHIF's error boundary, or the timeout: whichever comes first.
    const boundary = errorBoundaryLogged(firstConsoleLine).then(() => 'error boundary');
    const placed = page.waitForFunction(
      sn => {
        const tracked = (window.services?.measurementService?.getMeasurements() ?? []).length;
        const ds = (window.services?.displaySetService?.getActiveDisplaySets() ?? []).find(
          d => Number(d.SeriesNumber) === Number(sn)
        );
        const placed = (ds?.measurements ?? []).filter(m => m.loaded === true).length;
        return tracked > 0 || placed > 0;
      },
      step.seriesNumber,
      { timeout }
    ).then(() => 'placed', () => 'timeout');
    record.reached = (await Promise.race([placed, boundary])) === 'placed';
    info = await page.evaluate(displaySetInfo, step.seriesNumber);
    record.displaySet = info;
    // Placing a region (above) precedes drawing it: cornerstone draws the SR's regions
    // and their labels as SVG on the next render of the viewport. OHIF 3.13.2 adds them
    // after it rendered the SR viewport, and when the image was already on screen (a
    // single radiograph: no jump to another slice) nothing renders again until the
    // reader interacts (window/level, zoom, ...). So: wait for a drawn label; if none
    // comes within a few seconds, render the viewports once, as any interaction would
    // (recorded as renderRequested), and wait again.
    // A report whose only region is the image assessed has no label to wait for.
    record.labelled = record.reached && (await page.evaluate(placedWithLabels, step.seriesNumber));
    if (record.labelled) {
      const labelDrawn = ms => page
        .waitForFunction(
          () => Array.from(document.querySelectorAll(
            '[data-cy="viewport-pane"] svg text, .viewport-element svg text'
          )).some(t => t.textContent.trim()),
          null,
          { timeout: ms }
        )
        .then(() => true, () => false);
      record.renderRequested = false;
      record.drawn = await labelDrawn(5000);
      if (!record.drawn) {
        record.renderRequested = true;
        await page.evaluate(() => window.cornerstone.getRenderingEngines().forEach(e => e.render()));
        record.drawn = await labelDrawn(timeout);
      }
    }
  }
  if (step.alignSlices) {
    record.alignedViewports = await page.evaluate(alignSlicesWithActiveViewport);
  }
  for (const side of step.collapsePanels ?? []) {
    await clickIfVisible(page, `[data-cy="side-panel-header-${side}"]`, 3000);
  }
  await waitForSettled(page);
  record.errorBoundary = await errorBoundaryText(page, firstConsoleLine);
  // Which of the expected labels a person can read on the page (panel or image overlay).
  record.textVisible = {};
  for (const text of step.expectText ?? []) {
    record.textVisible[text] = await page
      .getByText(text, { exact: false })
      .first()
      .isVisible()
      .catch(() => false);
  }
  record.ms = Date.now() - started;
  log(`step ${index}: ${step.kind} ${record.reached ? 'loaded' : 'NOT loaded'} in ${record.ms} ms` +
      (record.errorBoundary ? ` (${record.errorBoundary})` : ''));
  await shot(page, `${String(index + 2).padStart(2, '0')}-${step.kind}`);
  record.state = await state(page);
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
    if (/Error Boundary/.test(line) && boundaryLogged) {
      boundaryLogged();
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
    await shot(page, 'final');
  }
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

// Browser test of the web UI of `sdw serve` (src/server/ui), driven through Debian's Chromium
// with playwright-core. The Rust test harness starts `sdw serve` on the tiny test model and
// sets SDW_URL; by hand:
//
//   cd tests/browser && npm install
//   SDW_URL=http://127.0.0.1:7860 node --test tests/browser/ui.test.mjs
//
// CHROMIUM overrides the browser binary (default /usr/bin/chromium). Each run uses a fresh
// profile in a temporary directory. The tests run in order and share one page.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const BASE = process.env.SDW_URL;
const LONG = 180_000; // the first generation loads the model; CPU generation is slow
const TEST = { timeout: 300_000 };
const TRAIN_LONG = 240_000; // a CPU training run of the tiny model takes ~10-60 s, longer on a busy machine
const TRAIN_TEST = { timeout: 900_000 };
const PROMPT = 'a red cube on a table';
const NEGATIVE = 'blurry';

let profile;
let context;
let page;
const consoleErrors = [];
// Errors the test provokes on purpose (the 409 of a taken LoRA name, the 413 of the too-large
// request) are expected.
const expectedErrors = [];

before(async () => {
  assert.ok(BASE, 'SDW_URL must be the address of a running `sdw serve` (the Rust harness sets it)');
  profile = fs.mkdtempSync(path.join(os.tmpdir(), 'sdw-ui-test-'));
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
    viewport: { width: 1280, height: 900 },
  });
  page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(LONG);
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => consoleErrors.push(`uncaught: ${e.message}`));
});

after(async () => {
  await context?.close();
  if (profile) fs.rmSync(profile, { recursive: true, force: true });
});

function unexpectedErrors() {
  return consoleErrors.filter((e) => !expectedErrors.some((re) => re.test(e)));
}

// Waits for the `n`th finished generation of a tab, failing at once with the page's error line
// if the UI shows one instead.
async function waitForGeneration(prefix, n) {
  const result = page
    .waitForSelector(`#${prefix}-results[data-gen="${n}"] img[src^="data:image/png;base64,"]`, { timeout: LONG })
    .then(() => null);
  const error = page
    .waitForSelector(`#${prefix}-error:not([hidden])`, { timeout: LONG })
    .then((h) => h.textContent());
  result.catch(() => {});
  error.catch(() => {});
  const shown = await Promise.race([result, error]);
  assert.equal(shown, null, `the UI showed an error instead of an image: ${shown}`);
}

async function infotexts(prefix) {
  return page.$$eval(`#${prefix}-results figure.result .infotext`, (nodes) => nodes.map((n) => n.textContent));
}

test('the page loads: checkpoints, samplers and schedulers from the API, no console errors', TEST, async () => {
  const res = await page.goto(BASE, { waitUntil: 'load' });
  assert.equal(res.status(), 200);
  await page.waitForSelector('body[data-ready="true"]');
  assert.equal(await page.isVisible('#error'), false, `page error: ${await page.textContent('#error')}`);
  const models = await page.$$eval('#model option', (o) => o.map((x) => x.value));
  assert.ok(models.length >= 1, 'the checkpoint dropdown lists no model');
  assert.ok(await page.inputValue('#model'), 'no checkpoint selected');
  const samplers = await page.$$eval('#t2i-sampler option', (o) => o.map((x) => x.value));
  assert.ok(samplers.length >= 1, 'the sampler dropdown is empty');
  assert.deepEqual(samplers, await page.$$eval('#i2i-sampler option', (o) => o.map((x) => x.value)));
  const schedulers = await page.$$eval('#t2i-scheduler option', (o) => o.map((x) => x.value));
  assert.ok(schedulers.includes('Automatic'), `schedulers: ${schedulers}`);
  assert.equal(await page.inputValue('#t2i-scheduler'), 'Automatic');
  for (const id of ['tab-txt2img', 'tab-img2img', 'tab-train', 'tab-pnginfo', 'tab-gallery']) {
    assert.ok(await page.isVisible(`#${id}`), `#${id} is not visible`);
  }
  assert.ok(await page.isVisible('#panel-txt2img'));
  assert.deepEqual(unexpectedErrors(), []);
});

test('txt2img: Generate shows the image, its infotext and progress elements', TEST, async () => {
  assert.equal(await page.$eval('#t2i-progress', (e) => e.tagName), 'PROGRESS');
  assert.equal(await page.isVisible('#t2i-interrupt'), false, 'Interrupt is visible while idle');
  await page.fill('#t2i-prompt', PROMPT);
  await page.fill('#t2i-negative', NEGATIVE);
  await page.fill('#t2i-steps', '2');
  await page.fill('#t2i-width', '64');
  await page.fill('#t2i-height', '64');
  await page.fill('#t2i-seed', '-1');
  const request = page.waitForRequest((r) => r.url().endsWith('/sdapi/v1/txt2img') && r.method() === 'POST');
  await page.click('#t2i-generate');
  const body = (await request).postDataJSON();
  assert.equal(body.prompt, PROMPT);
  assert.equal(body.negative_prompt, NEGATIVE);
  assert.equal(body.steps, 2);
  assert.equal(body.width, 64);
  assert.equal(body.height, 64);
  assert.equal(body.save_images, true);
  assert.equal(body.enable_hr, false);
  await waitForGeneration('t2i', 1);
  const texts = await infotexts('t2i');
  assert.equal(texts.length, 1);
  assert.match(texts[0], /Steps: 2\b/);
  assert.match(texts[0], /Size: 64x64/);
  assert.ok(texts[0].startsWith(PROMPT), texts[0]);
  const size = await page.$eval('#t2i-results img', (img) => img.decode().then(() => [img.naturalWidth, img.naturalHeight]));
  assert.deepEqual(size, [64, 64]);
  assert.equal(await page.isVisible('#t2i-interrupt'), false, 'Interrupt still visible after the generation');
  assert.equal(await page.isDisabled('#t2i-generate'), false);
});

test('txt2img: Ctrl+Enter and Cmd+Enter in the prompt generate', TEST, async () => {
  await page.focus('#t2i-prompt');
  await page.keyboard.press('Control+Enter');
  await waitForGeneration('t2i', 2);
  assert.equal(await page.inputValue('#t2i-prompt'), PROMPT, 'Ctrl+Enter changed the prompt');
  await page.focus('#t2i-prompt');
  await page.keyboard.press('Meta+Enter');
  await waitForGeneration('t2i', 3);
  assert.match((await infotexts('t2i'))[0], /Steps: 2\b/);
});

test('LoRA list: clicking a LoRA inserts <lora:NAME:1> into the prompt', TEST, async () => {
  const names = await page.$$eval('#t2i-loras button.lora', (b) => b.map((x) => x.textContent));
  if (!names.length) {
    // The test server may have no LoRA; the list must then say so.
    assert.match(await page.textContent('#t2i-loras'), /No LoRA/);
    return;
  }
  const before = await page.inputValue('#t2i-prompt');
  await page.click('#t2i-loras button.lora >> nth=0');
  const after = await page.inputValue('#t2i-prompt');
  assert.match(after, /<lora:[^:>]+:1>$/);
  assert.ok(after.startsWith(before));
  await page.fill('#t2i-prompt', PROMPT);
});

test('PNG Info: reads the generated PNG, and Send to txt2img fills the form', TEST, async () => {
  const src = await page.getAttribute('#t2i-results img', 'src');
  const seed = /Seed: (\d+)/.exec((await infotexts('t2i'))[0])[1];
  const png = Buffer.from(src.split(',')[1], 'base64');
  // Change the form so that sending back is seen.
  await page.fill('#t2i-prompt', 'something else');
  await page.fill('#t2i-negative', '');
  await page.fill('#t2i-steps', '7');
  await page.fill('#t2i-width', '128');
  await page.fill('#t2i-seed', '-1');
  await page.click('#tab-pnginfo');
  assert.ok(await page.isVisible('#panel-pnginfo'));
  await page.setInputFiles('#png-file', { name: 'generated.png', mimeType: 'image/png', buffer: png });
  await page.waitForFunction(() => /Steps: 2\b/.test(document.getElementById('png-info').textContent));
  assert.equal(await page.isVisible('#png-error'), false, await page.textContent('#png-error'));
  const table = await page.textContent('#png-params');
  assert.ok(table.includes(PROMPT), table);
  assert.ok(table.includes('Steps'), table);
  await page.click('#png-send-t2i');
  await page.waitForSelector('#panel-txt2img', { state: 'visible' });
  assert.equal(await page.inputValue('#t2i-prompt'), PROMPT);
  assert.equal(await page.inputValue('#t2i-negative'), NEGATIVE);
  assert.equal(await page.inputValue('#t2i-steps'), '2');
  assert.equal(await page.inputValue('#t2i-width'), '64');
  assert.equal(await page.inputValue('#t2i-height'), '64');
  assert.equal(await page.inputValue('#t2i-seed'), seed);
  assert.equal(await page.isVisible('#t2i-error'), false, await page.textContent('#t2i-error'));
});

test('Gallery lists the saved images, served by the server', TEST, async () => {
  await page.click('#tab-gallery');
  await page.waitForFunction(() => document.querySelectorAll('#gallery img').length >= 1);
  assert.equal(await page.isVisible('#gallery-error'), false, await page.textContent('#gallery-error'));
  const first = await page.$eval('#gallery img', (img) =>
    img.decode().then(
      () => [img.naturalWidth, img.getAttribute('src')],
      () => [0, img.getAttribute('src')],
    ),
  );
  assert.ok(first[0] > 0, `the gallery image ${first[1]} did not load`);
  // The outputs folder may hold other images too: ours are among the newest.
  const captions = await page.$$eval('#gallery figure.result .infotext', (n) => n.map((x) => x.textContent));
  assert.ok(captions.some((c) => c.startsWith(PROMPT) && /Steps: 2\b/.test(c)), captions.slice(0, 5).join('\n---\n'));
  await page.click('#gallery img >> nth=0');
  await page.waitForSelector('#lightbox', { state: 'visible' });
  assert.ok(await page.getAttribute('#lightbox-img', 'src'));
  await page.keyboard.press('Escape');
  await page.waitForSelector('#lightbox', { state: 'hidden' });
});

test('img2img: upload a photo, paint a mask, generate', TEST, async () => {
  await page.click('#tab-img2img');
  assert.ok(await page.isVisible('#panel-img2img'));
  // A 64x64 PNG drawn by the browser.
  const b64 = await page.evaluate(() => {
    const c = document.createElement('canvas');
    c.width = c.height = 64;
    const g = c.getContext('2d');
    const grad = g.createLinearGradient(0, 0, 64, 64);
    grad.addColorStop(0, '#3060c0');
    grad.addColorStop(1, '#e0a030');
    g.fillStyle = grad;
    g.fillRect(0, 0, 64, 64);
    g.fillStyle = '#fff';
    g.fillRect(20, 20, 24, 24);
    return c.toDataURL('image/png').split(',')[1];
  });
  await page.setInputFiles('#i2i-file', { name: 'photo.png', mimeType: 'image/png', buffer: Buffer.from(b64, 'base64') });
  await page.waitForSelector('#i2i-stage', { state: 'visible' });
  assert.deepEqual(await page.$eval('#i2i-mask', (c) => [c.width, c.height]), [64, 64]);
  assert.deepEqual(await page.$eval('#i2i-photo', (c) => [c.width, c.height]), [64, 64]);

  const box = await page.locator('#i2i-mask').boundingBox();
  assert.ok(box && box.width > 0 && box.height > 0, 'the mask canvas is not shown');
  await page.mouse.move(box.x + box.width * 0.2, box.y + box.height * 0.5);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width * 0.8, box.y + box.height * 0.5, { steps: 8 });
  await page.mouse.up();
  const painted = await page.$eval('#i2i-mask', (c) => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
    return n;
  });
  assert.ok(painted > 0, 'the stroke left nothing on the mask canvas');

  await page.fill('#i2i-prompt', 'a blue sphere');
  await page.fill('#i2i-steps', '2');
  await page.fill('#i2i-width', '64');
  await page.fill('#i2i-height', '64');
  await page.fill('#i2i-denoise', '0.75');
  const request = page.waitForRequest((r) => r.url().endsWith('/sdapi/v1/img2img') && r.method() === 'POST');
  await page.click('#i2i-generate');
  const body = (await request).postDataJSON();
  assert.equal(body.steps, 2);
  assert.equal(body.denoising_strength, 0.75);
  assert.equal(body.save_images, true);
  assert.match(body.init_images[0], /^data:image\/png;base64,/);
  assert.match(body.mask, /^data:image\/png;base64,/);
  // The mask: the photo's size, white where painted, black elsewhere.
  const mask = await page.evaluate(async (url) => {
    const img = new Image();
    img.src = url;
    await img.decode();
    const c = document.createElement('canvas');
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data;
    let white = 0;
    let black = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i] > 250 && d[i + 1] > 250 && d[i + 2] > 250) white++;
      if (d[i] < 5 && d[i + 1] < 5 && d[i + 2] < 5) black++;
    }
    return { w: c.width, h: c.height, white, black };
  }, body.mask);
  assert.equal(mask.w, 64);
  assert.equal(mask.h, 64);
  assert.ok(mask.white > 0 && mask.black > 0, JSON.stringify(mask));
  await waitForGeneration('i2i', 1);
  assert.match((await infotexts('i2i'))[0], /Steps: 2\b/);

  await page.click('#i2i-mask-clear');
  const left = await page.$eval('#i2i-mask', (c) => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    return d.some((v, i) => i % 4 === 3 && v > 0);
  });
  assert.equal(left, false, 'Clear left paint on the mask');
});

// A PNG drawn by the browser: a gradient with a square, `w`x`h`, tinted by `hue`.
async function browserPng(w, h, hue) {
  const b64 = await page.evaluate(
    ([w, h, hue]) => {
      const c = document.createElement('canvas');
      c.width = w;
      c.height = h;
      const g = c.getContext('2d');
      const grad = g.createLinearGradient(0, 0, w, h);
      grad.addColorStop(0, `hsl(${hue} 60% 40%)`);
      grad.addColorStop(1, `hsl(${hue + 120} 70% 60%)`);
      g.fillStyle = grad;
      g.fillRect(0, 0, w, h);
      g.fillStyle = '#fff';
      g.fillRect(w / 3, h / 3, w / 3, h / 3);
      return c.toDataURL('image/png').split(',')[1];
    },
    [w, h, hue],
  );
  return Buffer.from(b64, 'base64');
}

// Waits until the Train tab's run matches `want` ({name, state, stepAbove, visible: id}) and returns
// {state, step, text}; fails at once if the tab shows an error (#train-error), the run failed, or
// (waiting for "cancelled") the run finished first.
async function waitTrain(want, timeout = TRAIN_LONG) {
  const handle = await page.waitForFunction(
    (want) => {
      const err = document.getElementById('train-error');
      const line = document.getElementById('train-state');
      const state = line.dataset.state;
      const step = Number(line.dataset.step);
      if (!err.hidden) return { error: err.textContent };
      if (state === 'failed') return { error: line.textContent };
      if (want.name && !line.textContent.startsWith(`${want.name}: `)) return false;
      if (want.state === 'cancelled' && state === 'done') return { error: `the run finished before Cancel: ${line.textContent}` };
      if (want.state && state !== want.state) return false;
      if (want.stepAbove != null && !(step > want.stepAbove)) return false;
      if (want.visible && document.getElementById(want.visible).hidden) return false;
      return { state, step, text: line.textContent };
    },
    want,
    { timeout, polling: 100 },
  );
  const got = await handle.jsonValue();
  assert.ok(!got.error, `the Train tab showed an error while waiting for ${JSON.stringify(want)}: ${got.error}`);
  return got;
}

test('Train: a DreamBooth-LoRA run to the end; loss plot, validation images, "Use in txt2img"', TRAIN_TEST, async () => {
  await page.click('#tab-train');
  assert.ok(await page.isVisible('#panel-train'));
  assert.equal(await page.getAttribute('#train-instance', 'placeholder'), 'photo of sks person');
  assert.equal(await page.getAttribute('#train-class', 'placeholder'), 'photo of a person');
  assert.equal(await page.inputValue('#train-steps'), '800');
  assert.equal(await page.inputValue('#train-resolution'), '512');
  assert.equal(await page.getAttribute('#train-resolution', 'step'), '8');
  assert.equal(await page.inputValue('#train-rank'), '4');
  assert.equal(Number(await page.inputValue('#train-lr')), 0.0001);
  assert.equal(await page.inputValue('#train-validation-every'), '');

  // Two 64x64 photos, and a large one that is scaled down to 1024 px, then removed again.
  const photos = [
    { name: 'one.png', mimeType: 'image/png', buffer: await browserPng(64, 64, 20) },
    { name: 'two.png', mimeType: 'image/png', buffer: await browserPng(64, 64, 200) },
    { name: 'big.png', mimeType: 'image/png', buffer: await browserPng(1500, 300, 100) },
  ];
  await page.setInputFiles('#train-files', photos);
  await page.waitForFunction(() => document.querySelectorAll('#train-photos li.thumb:not(.loading) img').length === 3);
  const sizes = await page.$$eval('#train-photos img', (imgs) =>
    Promise.all(imgs.map((i) => i.decode().then(() => [i.naturalWidth, i.naturalHeight]))),
  );
  assert.deepEqual(sizes, [[64, 64], [64, 64], [1024, 205]]);
  await page.click('#train-photos li.thumb >> nth=2 >> button.remove');
  await page.waitForFunction(() => document.querySelectorAll('#train-photos li.thumb').length === 2);

  await page.fill('#train-name', 'me');
  await page.fill('#train-instance', 'photo of sks person');
  await page.fill('#train-class', '');
  await page.fill('#train-steps', '6');
  await page.fill('#train-resolution', '64');
  await page.fill('#train-rank', '2');
  await page.fill('#train-validation-prompt', '');
  await page.fill('#train-validation-every', '3');
  const request = page.waitForRequest((r) => r.url().endsWith('/sdw/v1/train') && r.method() === 'POST');
  await page.click('#train-start');
  const body = (await request).postDataJSON();
  assert.equal(body.name, 'me');
  assert.equal(body.instance_prompt, 'photo of sks person');
  assert.equal(body.class_prompt, undefined);
  assert.equal(body.steps, 6);
  assert.equal(body.resolution, 64);
  assert.equal(body.rank, 2);
  assert.equal(body.learning_rate, 0.0001);
  assert.equal(body.validation_every, 3);
  assert.equal(body.resume, false);
  assert.equal(body.images.length, 2);
  for (const img of body.images) assert.match(img, /^data:image\/png;base64,/);

  const done = await waitTrain({ name: 'me', state: 'done', visible: 'train-done' }, 240_000);
  assert.match(done.text, /step 6\/6/);
  assert.match(await page.textContent('#train-done'), /\bme\b/);
  assert.equal(await page.isVisible('#train-cancel'), false, 'Cancel is visible after the run');
  assert.equal(await page.isVisible('#train-resume'), false, 'Resume is visible after a finished run');
  assert.equal(await page.$eval('#train-progress', (p) => p.value), 1);

  // The loss plot was drawn.
  await page.waitForSelector('#train-loss', { state: 'visible' });
  const painted = await page.$eval('#train-loss', (c) => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
    return n;
  });
  assert.ok(painted > 200, `the loss canvas is (nearly) blank: ${painted} painted pixels`);

  // The validation grids load, and open in the lightbox.
  await page.waitForFunction(
    () => [...document.querySelectorAll('#train-validation img')].some((i) => i.complete && i.naturalWidth > 0),
    null,
    { timeout: 30_000 },
  );
  await page.click('#train-validation img >> nth=0');
  await page.waitForSelector('#lightbox', { state: 'visible' });
  assert.match(await page.getAttribute('#lightbox-img', 'src'), /validation/);
  assert.equal(await page.isVisible('#lightbox-send-t2i'), false, 'a validation grid has no parameters to send');
  await page.keyboard.press('Escape');
  await page.waitForSelector('#lightbox', { state: 'hidden' });

  // "Use in txt2img": the txt2img tab, the LoRA in its list and in the prompt.
  const before = await page.inputValue('#t2i-prompt');
  await page.click('#train-use');
  await page.waitForSelector('#panel-txt2img', { state: 'visible' });
  await page.waitForFunction(() => document.getElementById('t2i-prompt').value.includes('<lora:me:1>'));
  const prompt = await page.inputValue('#t2i-prompt');
  assert.ok(prompt.startsWith(before) && prompt.endsWith('<lora:me:1>'), prompt);
  const loras = await page.$$eval('#t2i-loras button.lora', (b) => b.map((x) => x.textContent));
  assert.ok(loras.some((n) => n === 'me' || n.startsWith('me (')), `the LoRA list lacks "me": ${loras}`);
  await page.fill('#t2i-prompt', PROMPT);
});

test('Train: a name already taken is refused (409) and shown', TEST, async () => {
  await page.click('#tab-train');
  expectedErrors.push(/status of 409/);
  await page.fill('#train-name', 'me');
  await page.click('#train-start');
  await page.waitForSelector('#train-error', { state: 'visible' });
  const text = await page.textContent('#train-error');
  assert.match(text, /HTTP 409/, text);
  assert.match(text, /\bme\b/, text);
  // The finished run is still shown.
  assert.equal(await page.getAttribute('#train-state', 'data-state'), 'done');
  assert.ok(await page.isVisible('#train-done'));
});

test('Train: Cancel stops a run, Resume continues it', TRAIN_TEST, async () => {
  await page.click('#tab-train');
  await page.fill('#train-name', 'me2');
  await page.fill('#train-steps', '400');
  await page.fill('#train-resolution', '64');
  await page.fill('#train-validation-every', ''); // the server's default: no grid every 3 steps
  const request = page.waitForRequest((r) => r.url().endsWith('/sdw/v1/train') && r.method() === 'POST');
  await page.click('#train-start');
  const body = (await request).postDataJSON();
  assert.equal(body.name, 'me2');
  assert.equal(body.steps, 400);
  assert.equal('validation_every' in body, false);
  assert.equal(body.images.length, 2);

  await waitTrain({ name: 'me2', stepAbove: 1 }, 240_000);
  assert.ok(await page.isVisible('#train-cancel'), 'no Cancel button while running');
  assert.equal(await page.isVisible('#train-resume'), false);
  assert.equal(await page.isDisabled('#train-start'), true, 'Start is enabled while a run is in progress');
  await page.click('#train-cancel');
  const cancelled = await waitTrain({ name: 'me2', state: 'cancelled', visible: 'train-resume' }, 240_000);
  assert.ok(cancelled.step >= 2 && cancelled.step < 400, cancelled.text);
  assert.equal(await page.isVisible('#train-cancel'), false);

  const resume = page.waitForRequest((r) => r.url().endsWith('/sdw/v1/train') && r.method() === 'POST');
  await page.click('#train-resume');
  const again = (await resume).postDataJSON();
  assert.equal(again.name, 'me2');
  assert.equal(again.resume, true);
  assert.ok(!again.images || again.images.length === 0, 'Resume sent photos');
  assert.equal(again.steps, 400);
  assert.equal(again.rank, 2);
  await waitTrain({ name: 'me2', stepAbove: cancelled.step }, 240_000);
  await page.click('#train-cancel');
  const second = await waitTrain({ name: 'me2', state: 'cancelled', visible: 'train-resume' }, 240_000);
  assert.ok(second.step > cancelled.step && second.step < 400, second.text);
});

test('settings are kept across a reload', TEST, async () => {
  await page.click('#tab-img2img');
  await page.waitForTimeout(600); // settings are saved 250 ms after the last change
  await page.reload({ waitUntil: 'load' });
  await page.waitForSelector('body[data-ready="true"]');
  assert.ok(await page.isVisible('#panel-img2img'), 'the open tab was not kept');
  assert.equal(await page.inputValue('#t2i-prompt'), PROMPT);
  assert.equal(await page.inputValue('#t2i-steps'), '2');
  assert.equal(await page.inputValue('#t2i-width'), '64');
  assert.equal(await page.inputValue('#i2i-prompt'), 'a blue sphere');
  assert.equal(await page.inputValue('#i2i-steps'), '2');
  assert.equal(await page.inputValue('#train-name'), 'me2');
  assert.equal(await page.inputValue('#train-instance'), 'photo of sks person');
  assert.equal(await page.inputValue('#train-steps'), '400');
  assert.equal(await page.inputValue('#train-rank'), '2');
  // The last run is shown again after the reload.
  assert.equal(await page.getAttribute('#train-state', 'data-state'), 'cancelled');
  assert.match(await page.textContent('#train-state'), /^me2: cancelled/);
  assert.equal(await page.$eval('#train-resume', (b) => b.hidden), false, 'no Resume button after the reload');
  assert.deepEqual(unexpectedErrors(), []);
});

test('checkpoint switch (when the server has several)', TEST, async () => {
  const models = await page.$$eval('#model option', (o) => o.map((x) => x.value));
  if (models.length < 2) return;
  const current = await page.inputValue('#model');
  const other = models.find((m) => m !== current);
  const req = page.waitForRequest((r) => r.url().endsWith('/sdapi/v1/options') && r.method() === 'POST');
  await page.selectOption('#model', other);
  assert.deepEqual((await req).postDataJSON(), { sd_model_checkpoint: other });
  await page.waitForFunction(() => !document.getElementById('model').disabled);
  assert.equal(await page.isVisible('#error'), false, await page.textContent('#error'));
  await page.selectOption('#model', current);
  await page.waitForFunction(() => !document.getElementById('model').disabled);
});

test('a refused request shows the server\'s error detail', TEST, async () => {
  await page.click('#tab-txt2img');
  expectedErrors.push(/status of 413/);
  await page.fill('#t2i-width', '4096');
  await page.click('#t2i-generate');
  await page.waitForSelector('#t2i-error', { state: 'visible' });
  const text = await page.textContent('#t2i-error');
  assert.match(text, /2048/, text);
  assert.match(text, /HTTP 413/, text);
  await page.fill('#t2i-width', '64');
  await page.waitForFunction(() => !document.getElementById('t2i-generate').disabled);
});

test('phone width: one column, nothing wider than the screen', TEST, async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  for (const tab of ['txt2img', 'img2img', 'train', 'pnginfo', 'gallery']) {
    await page.click(`#tab-${tab}`);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - document.documentElement.clientWidth);
    assert.ok(overflow <= 0, `${tab} is ${overflow}px wider than the phone screen`);
  }
  await page.click('#tab-txt2img');
  const [output, settings] = await Promise.all(
    ['#panel-txt2img .output', '#panel-txt2img .settings'].map((s) => page.locator(s).boundingBox()),
  );
  assert.ok(output.y < settings.y && Math.abs(output.x - settings.x) < 2, 'results are not above the settings');
  assert.deepEqual(unexpectedErrors(), []);
});

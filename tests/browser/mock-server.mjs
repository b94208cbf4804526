// MOCK of `sdw serve`'s HTTP API, for developing the web UI (src/server/ui) without the Rust
// server or a model. It is NOT used by the real browser test, which runs against `sdw serve`.
//
//   node tests/browser/mock-server.mjs [port]      (default 7861; serves the UI files from disk)
//   SDW_URL=http://127.0.0.1:7861 node --test tests/browser/ui.test.mjs
//
// Canned answers: "generated" images are flat-coloured PNGs with an A1111 `parameters` text chunk;
// generation takes ~150 ms a step so the progress bar and the Interrupt button can be seen.
// Training (/sdw/v1/train) is simulated: ~300 ms queued, ~300 ms preparing, then a step every ~100 ms
// with a made-up falling loss; a validation grid every `validation_every` steps (default: at half the
// run); cancel stops after the current step (state "cancelled", resumable); done adds the LoRA to
// /sdapi/v1/loras.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const uiDir = path.join(here, '..', '..', 'src', 'server', 'ui');
const port = Number(process.argv[2] || process.env.PORT || 7861);

// --- PNG ------------------------------------------------------------------------------------

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(buf) {
  let c = 0xffffffff;
  for (const b of buf) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
function chunk(type, data) {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(td));
  return Buffer.concat([len, td, crc]);
}
function png(width, height, seed, text) {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // RGB
  const raw = Buffer.alloc((width * 3 + 1) * height);
  const r0 = seed % 256, g0 = (seed >> 8) % 256;
  for (let y = 0; y < height; y++) {
    const row = y * (width * 3 + 1);
    for (let x = 0; x < width; x++) {
      raw[row + 1 + x * 3] = (r0 + x * 2) & 255;
      raw[row + 2 + x * 3] = (g0 + y * 2) & 255;
      raw[row + 3 + x * 3] = 128;
    }
  }
  const parts = [Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr)];
  if (text) {
    // iTXt (UTF-8): keyword \0 compression-flag compression-method language \0 translated \0 text
    parts.push(chunk('iTXt', Buffer.concat([Buffer.from('parameters\0\0\0\0\0'), Buffer.from(text, 'utf8')])));
  }
  parts.push(chunk('IDAT', zlib.deflateSync(raw)), chunk('IEND', Buffer.alloc(0)));
  return Buffer.concat(parts);
}
function pngText(buf) {
  let i = 8;
  while (i + 8 <= buf.length) {
    const len = buf.readUInt32BE(i);
    const type = buf.toString('latin1', i + 4, i + 8);
    const data = buf.subarray(i + 8, i + 8 + len);
    if (type === 'tEXt' || type === 'iTXt') {
      const nul = data.indexOf(0);
      if (data.toString('latin1', 0, nul) === 'parameters') {
        if (type === 'tEXt') return data.toString('latin1', nul + 1);
        let j = nul + 3;
        j = data.indexOf(0, j) + 1; // language
        j = data.indexOf(0, j) + 1; // translated keyword
        return data.toString('utf8', j);
      }
    }
    i += 12 + len;
  }
  return '';
}
function pngSize(buf) {
  return [buf.readUInt32BE(16), buf.readUInt32BE(20)];
}

// --- state ----------------------------------------------------------------------------------

const models = [
  { title: 'tiny.safetensors [0123456789]', model_name: 'tiny', hash: '0123456789', sha256: '0123456789abcdef', filename: '/models/tiny.safetensors', config: null },
  { title: 'other.safetensors [abcdef0123]', model_name: 'other', hash: 'abcdef0123', sha256: 'abcdef0123456789', filename: '/models/other.safetensors', config: null },
];
const options = { sd_model_checkpoint: models[0].title, sd_vae: 'Automatic', CLIP_stop_at_last_layers: 1 };
const samplerNames = ['Euler a', 'Euler', 'Heun', 'DPM2', 'LMS', 'DPM++ 2M', 'DPM++ 2S a', 'DDIM'];
const schedulers = ['Automatic', 'Uniform', 'Karras', 'Exponential'];
const gallery = []; // newest first: {name, url, infotext, png}
let counter = 0;
let job = null; // {step, steps, jobNo, jobCount, started, interrupted, skipped, preview}
const loras = [
  { name: 'detail_tweaker', alias: 'detail_tweaker', path: '/models/Lora/detail_tweaker.safetensors', metadata: {} },
  { name: 'my_style', alias: 'my_style', path: '/models/Lora/my_style.safetensors', metadata: {} },
];

function infotext(p, seed, w, h) {
  let t = p.prompt || '';
  if (p.negative_prompt) t += `\nNegative prompt: ${p.negative_prompt}`;
  const parts = [`Steps: ${p.steps}`, `Sampler: ${p.sampler_name || 'Euler'}`];
  if (p.scheduler && p.scheduler !== 'Automatic') parts.push(`Schedule type: ${p.scheduler}`);
  parts.push(`CFG scale: ${p.cfg_scale}`, `Seed: ${seed}`, `Size: ${w}x${h}`, `Model hash: ${models[0].hash}`, `Model: ${options.sd_model_checkpoint.split('.')[0]}`);
  if (p.init_images) parts.push(`Denoising strength: ${p.denoising_strength}`);
  if (p.mask) parts.push(`Mask blur: ${p.mask_blur}`);
  parts.push('Version: sdw mock');
  return `${t}\n${parts.join(', ')}`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fail(status, detail) {
  const e = new Error(detail);
  e.status = status;
  return e;
}

async function generate(p, kind) {
  const steps = p.steps ?? 50, w = p.width ?? 512, h = p.height ?? 512;
  if (w > 2048 || h > 2048) throw fail(413, `${w}x${h} is larger than the server's 2048x2048`);
  if (w % 8 || h % 8) throw fail(422, `width and height must be multiples of 8, got ${w}x${h}`);
  if (p.sampler_name && !samplerNames.includes(p.sampler_name)) throw fail(422, `unknown sampler ${JSON.stringify(p.sampler_name)}`);
  if (kind === 'img2img') {
    if (!p.init_images || !p.init_images.length) throw fail(422, 'img2img needs init_images');
    const init = Buffer.from(p.init_images[0].split(',').pop(), 'base64');
    if (p.mask) {
      const mask = Buffer.from(p.mask.split(',').pop(), 'base64');
      const [a, b] = [pngSize(init).join('x'), pngSize(mask).join('x')];
      if (a !== b) throw fail(422, `the mask is ${b}, the image ${a}`);
    }
  }
  if (job) throw fail(409, 'busy');
  const n = (p.batch_size ?? 1) * (p.n_iter ?? 1);
  const seed0 = p.seed == null || p.seed < 0 ? Math.floor(Math.random() * 4294967294) : p.seed;
  job = { step: 0, steps, jobNo: 0, jobCount: p.n_iter ?? 1, started: Date.now(), interrupted: false, skipped: false, preview: null };
  const images = [], infotexts = [], seeds = [];
  try {
    for (let i = 0; i < n; i++) {
      job.jobNo = i;
      for (job.step = 0; job.step < steps && !job.interrupted && !job.skipped; job.step++) {
        await sleep(150);
        if (job.step === 1) job.preview = png(Math.max(8, w / 8), Math.max(8, h / 8), seed0).toString('base64');
      }
      job.skipped = false;
      const seed = seed0 + i;
      const text = infotext(p, seed, w, h);
      const buf = png(w, h, seed, text);
      images.push(buf.toString('base64'));
      infotexts.push(text);
      seeds.push(seed);
      if (p.save_images) {
        counter++;
        const name = `${kind}/${String(counter).padStart(5, '0')}-${seed}.png`;
        gallery.unshift({ name, url: `/outputs/${name}`, infotext: text, png: buf });
      }
      if (job.interrupted) break;
    }
  } finally {
    job = null;
  }
  const info = { prompt: p.prompt, seed: seeds[0], all_seeds: seeds, infotexts, width: w, height: h, steps, index_of_first_image: 0 };
  return { images, parameters: p, info: JSON.stringify(info) };
}

function parseParams(text) {
  const out = {};
  const lines = text.trim().split('\n');
  const last = lines.pop() || '';
  const neg = lines.findIndex((l) => l.startsWith('Negative prompt:'));
  out.Prompt = (neg < 0 ? lines : lines.slice(0, neg)).join('\n');
  out['Negative prompt'] = neg < 0 ? '' : lines.slice(neg).join('\n').slice('Negative prompt:'.length).trim();
  for (const m of last.matchAll(/\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g)) out[m[1].trim()] = m[2].trim();
  const size = /^(\d+)x(\d+)$/.exec(out.Size || '');
  if (size) [out['Size-1'], out['Size-2']] = [Number(size[1]), Number(size[2])];
  for (const k of ['Steps', 'CFG scale', 'Seed']) if (k in out) out[k] = Number(out[k]);
  return out;
}

// --- training -------------------------------------------------------------------------------

const TRAIN_STEP_MS = Number(process.env.MOCK_TRAIN_STEP_MS || 100);
const trainFiles = new Map(); // /outputs/train/... -> PNG
const runs = new Map(); // name -> {name, total, every, losses, validation, checkpoint, photos}
let training = { state: 'idle', name: '', total: 0, error: null, lora: null, run: null };
let trainStop = false;

function trainReport() {
  const { run, ...s } = training;
  if (!run) return s;
  return {
    ...s,
    step: run.losses.length ? run.losses[run.losses.length - 1][0] : 0,
    losses: run.losses,
    validation: run.validation,
    loss_plot: run.losses.length ? `/outputs/train/${run.name}-training/loss.png` : null,
  };
}

function checkTrainRequest(b) {
  const name = typeof b.name === 'string' ? b.name.trim() : '';
  if (!name || name.startsWith('.') || !/^[\p{L}\p{N}\-_. ]+$/u.test(name)) {
    throw fail(422, `name ${JSON.stringify(name)}: use letters, digits, '-', '_', '.' and spaces`);
  }
  if (loras.some((l) => l.name === name)) throw fail(409, `a LoRA named ${JSON.stringify(name)} exists; choose another name`);
  const run = runs.get(name);
  if (b.resume) {
    if (!run || run.checkpoint == null) throw fail(404, `no run named ${JSON.stringify(name)} to resume`);
  } else {
    if (run) throw fail(409, `a run named ${JSON.stringify(name)} exists: resume it or choose another name`);
    const images = b.images || [];
    if (!images.length || images.length > 100) throw fail(422, `send 1 to 100 photos (got ${images.length})`);
    images.forEach((img, i) => {
      const buf = Buffer.from(String(img).split(',').pop(), 'base64');
      if (buf.length < 24 || buf.toString('latin1', 1, 4) !== 'PNG') throw fail(422, `images[${i}]: not a PNG the mock can read`);
    });
  }
  if (!b.instance_prompt || !String(b.instance_prompt).trim()) {
    throw fail(422, 'instance_prompt is required, e.g. "photo of sks person"');
  }
  const int = (k, def, min) => {
    const v = b[k] ?? def;
    if (!Number.isInteger(v) || v < min) throw fail(422, `${k} must be a whole number >= ${min}, got ${JSON.stringify(b[k])}`);
    return v;
  };
  const steps = int('steps', 800, 1);
  const resolution = int('resolution', 512, 64);
  if (resolution % 8) throw fail(422, `resolution must be a multiple of 8, got ${resolution}`);
  int('rank', 4, 1);
  const lr = b.learning_rate ?? 1e-4;
  if (!(typeof lr === 'number' && lr > 0 && Number.isFinite(lr))) throw fail(422, `learning_rate must be > 0, got ${JSON.stringify(lr)}`);
  const every = b.validation_every == null ? Math.max(1, Math.floor(steps / 2)) : int('validation_every', 0, 0);
  return { name, steps, resolution, every };
}

function startTraining(b) {
  const { name, steps, resolution, every } = checkTrainRequest(b);
  if (training.state === 'queued' || training.state === 'running') {
    throw fail(409, `the run ${JSON.stringify(training.name)} is still ${training.state}; cancel it first`);
  }
  let run = runs.get(name);
  if (b.resume) {
    run.losses = run.losses.filter((l) => l[0] <= run.checkpoint);
    Object.assign(run, { total: steps, every });
  } else {
    run = { name, total: steps, every, resolution, losses: [], validation: [], checkpoint: null };
    runs.set(name, run);
  }
  training = { state: 'queued', name, total: steps, error: null, lora: null, run };
  trainStop = false;
  trainLoop(run);
}

async function trainLoop(run) {
  await sleep(300);
  training.state = 'running';
  await sleep(300); // "loading the model"
  let step = run.checkpoint ?? 0;
  let smooth = run.losses.length ? run.losses[run.losses.length - 1][2] : null;
  while (step < run.total) {
    await sleep(TRAIN_STEP_MS);
    step++;
    const loss = 0.05 + 0.25 * Math.exp((-3 * step) / run.total) + (Math.random() - 0.5) * 0.08;
    smooth = smooth == null ? loss : smooth * 0.9 + loss * 0.1;
    run.losses.push([step, loss, smooth]);
    if (run.every > 0 && step % run.every === 0) {
      const url = `/outputs/train/${run.name}-training/validation/step-${String(step).padStart(6, '0')}.png`;
      const side = Math.min(run.resolution, 128);
      trainFiles.set(url, png(side * 2, side, step * 977));
      if (!run.validation.includes(url)) run.validation.push(url);
    }
    trainFiles.set(`/outputs/train/${run.name}-training/loss.png`, png(64, 48, step));
    if (trainStop) {
      run.checkpoint = step;
      training.state = 'cancelled';
      return;
    }
  }
  run.checkpoint = step;
  loras.push({ name: run.name, alias: run.name, path: `/models/Lora/${run.name}.safetensors`, metadata: {} });
  Object.assign(training, { state: 'done', lora: `${run.name}.safetensors` });
}

// --- HTTP -----------------------------------------------------------------------------------

function send(res, status, body, type = 'application/json') {
  const data = typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
  res.end(data);
}

async function readJson(req) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : {};
}

const UI_FILES = {
  '/': ['index.html', 'text/html; charset=utf-8'],
  '/ui/app.js': ['app.js', 'text/javascript; charset=utf-8'],
  '/ui/style.css': ['style.css', 'text/css; charset=utf-8'],
};

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  const route = `${req.method} ${url.pathname}`;
  try {
    if (req.method === 'GET' && UI_FILES[url.pathname]) {
      const [file, type] = UI_FILES[url.pathname];
      return send(res, 200, fs.readFileSync(path.join(uiDir, file)), type);
    }
    if (req.method === 'GET' && url.pathname.startsWith('/outputs/')) {
      const g = gallery.find((x) => x.url === url.pathname);
      const buf = g ? g.png : trainFiles.get(url.pathname);
      return buf ? send(res, 200, buf, 'image/png') : send(res, 404, { error: 'HTTPException', detail: 'no such image', body: '', errors: '' });
    }
    switch (route) {
      case 'GET /sdapi/v1/sd-models':
        return send(res, 200, models);
      case 'GET /sdapi/v1/options':
        return send(res, 200, options);
      case 'POST /sdapi/v1/options': {
        const body = await readJson(req);
        if (body.sd_model_checkpoint) {
          if (!models.some((m) => m.title === body.sd_model_checkpoint)) {
            return send(res, 404, { error: 'HTTPException', detail: `no checkpoint ${body.sd_model_checkpoint}`, body: '', errors: '' });
          }
          await sleep(500);
          options.sd_model_checkpoint = body.sd_model_checkpoint;
        }
        return send(res, 200, 'null');
      }
      case 'GET /sdapi/v1/samplers':
        return send(res, 200, samplerNames.map((name) => ({ name, aliases: [name.toLowerCase().replace(/\W+/g, '_')], options: {} })));
      case 'GET /sdapi/v1/schedulers':
        return send(res, 200, schedulers.map((label) => ({ name: label.toLowerCase(), label, aliases: null, default_rho: -1, need_inner_model: false })));
      case 'GET /sdapi/v1/loras':
        return send(res, 200, loras);
      case 'POST /sdapi/v1/txt2img':
      case 'POST /sdapi/v1/img2img':
        return send(res, 200, await generate(await readJson(req), url.pathname.split('/').pop()));
      case 'GET /sdapi/v1/progress': {
        if (!job) {
          return send(res, 200, { progress: 0, eta_relative: 0, state: { job: '', job_count: 0, job_no: 0, sampling_step: 0, sampling_steps: 0, interrupted: false, skipped: false }, current_image: null, textinfo: null });
        }
        const progress = (job.jobNo + job.step / job.steps) / Math.max(1, job.jobCount);
        const elapsed = (Date.now() - job.started) / 1000;
        return send(res, 200, {
          progress,
          eta_relative: progress > 0 ? (elapsed / progress) * (1 - progress) : 0,
          state: { job: 'mock', job_count: job.jobCount, job_no: job.jobNo, sampling_step: job.step, sampling_steps: job.steps, interrupted: job.interrupted, skipped: job.skipped },
          current_image: url.searchParams.get('skip_current_image') === 'true' ? null : job.preview,
          textinfo: null,
        });
      }
      case 'POST /sdapi/v1/interrupt':
        if (job) job.interrupted = true;
        return send(res, 200, {});
      case 'POST /sdapi/v1/skip':
        if (job) job.skipped = true;
        return send(res, 200, {});
      case 'POST /sdapi/v1/png-info': {
        const body = await readJson(req);
        if (!body.image) return send(res, 422, { error: 'RequestValidationError', detail: 'image is required', body: '', errors: '' });
        const buf = Buffer.from(body.image.split(',').pop(), 'base64');
        const text = pngText(buf);
        return send(res, 200, { info: text, items: {}, parameters: text ? parseParams(text) : {} });
      }
      case 'GET /sdw/v1/train':
        return send(res, 200, trainReport());
      case 'POST /sdw/v1/train':
        startTraining(await readJson(req));
        return send(res, 202, trainReport());
      case 'POST /sdw/v1/train/cancel':
        trainStop = true;
        return send(res, 200, trainReport());
      case 'GET /sdw/v1/gallery':
        return send(res, 200, gallery.map(({ name, url: u, infotext: t }) => ({ name, url: u, infotext: t })));
      default:
        return send(res, 404, { error: 'HTTPException', detail: `mock: no route ${route}`, body: '', errors: '' });
    }
  } catch (e) {
    const status = e.status || 500;
    const error = status === 500 ? 'RuntimeError' : status === 422 ? 'RequestValidationError' : 'HTTPException';
    return send(res, status, { error, detail: e.message, body: '', errors: e.message });
  }
});

server.listen(port, '127.0.0.1', () => console.log(`sdw UI mock on http://127.0.0.1:${port}/`));

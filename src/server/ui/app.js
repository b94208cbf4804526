// The browser UI of `sdw serve`: plain JS, no framework, no build step.
// It talks to the server's A1111-compatible API (/sdapi/v1/...) and /sdw/v1/gallery.
//
// Element ids (tests/browser/ui.test.mjs relies on them):
//   Header:     #model (checkpoint <select>), #model-refresh, #model-status, #error (page-wide error line)
//   Tabs:       #tab-txt2img #tab-img2img #tab-train #tab-pnginfo #tab-gallery (buttons; also reachable as
//               URL hashes #txt2img ...), panels #panel-txt2img #panel-img2img #panel-train #panel-pnginfo
//               #panel-gallery
//   txt2img / img2img, prefix P = "t2i" / "i2i" (built from <template id="gen-template">):
//     #P-prompt #P-negative (textareas; Ctrl/Cmd+Enter anywhere in the tab generates)
//     #P-generate #P-interrupt #P-skip (the last two are visible only while generating)
//     #P-error (error line), #P-progress (<progress>, 0..1), #P-progress-text ("Step i/N · ETA"), #P-preview (live <img>)
//     #P-results (result grid; its data-gen attribute counts finished generations; each result is a
//                 figure.result with an <img src="data:image/png;base64,..."> and a figcaption.infotext)
//     #P-sampler #P-scheduler #P-steps #P-cfg #P-width #P-height #P-seed #P-seed-random #P-seed-reuse
//     #P-batch-count #P-batch-size #P-swap #P-loras (LoRA list; clicking inserts <lora:NAME:1>) #P-lora-filter
//     txt2img only: #t2i-enable-hr #t2i-hr-scale #t2i-hr-steps #t2i-hr-denoise
//     img2img only: #i2i-file (<input type=file>) #i2i-drop #i2i-stage #i2i-photo (canvas) #i2i-mask (canvas
//                   drawn on with the pointer) #i2i-brush #i2i-erase #i2i-mask-clear #i2i-image-clear
//                   #i2i-denoise #i2i-resize-mode #i2i-mask-blur #i2i-fill #i2i-full-res
//   PNG Info:   #png-file #png-drop #png-image #png-error #png-info (infotext) #png-params (table)
//               #png-send-t2i #png-send-i2i
//   Gallery:    #gallery (grid of figure.result) #gallery-refresh #gallery-count #gallery-error #gallery-more
//   Train:      form: #train-name #train-files (<input type=file multiple>) #train-drop #train-photos (thumbnails:
//               li.thumb with an <img> and a button.remove each) #train-photo-count #train-instance #train-class
//               #train-steps #train-resolution #train-rank #train-lr #train-validation-prompt
//               #train-validation-every (empty = the server's default) #train-start #train-error (error line)
//               live view #train-live (hidden while the server has no run): #train-state (e.g. "me: running ·
//               step 120/800 · loss 0.1234"; its data-state and data-step attributes hold the run's state and
//               step) #train-cancel (visible while queued/running) #train-resume (visible when the last run is
//               cancelled) #train-progress (<progress>, 0..1) #train-loss (<canvas>: loss plot)
//               #train-loss-plot (link to the server's loss.png) #train-validation (an <img> per validation
//               grid, newest first; click opens the lightbox) #train-done (shown when done; names the LoRA)
//               #train-use ("Use in txt2img")
//   Lightbox:   #lightbox #lightbox-img #lightbox-info #lightbox-download #lightbox-send-t2i
//               #lightbox-send-i2i #lightbox-close
//   <body data-ready="true"> once the lists (models, samplers, LoRAs) have been asked for.
//   Settings are kept in localStorage under "sdw-ui-settings-v1" (the Train form's too, not its photos);
//   the last training request (without photos, for Resume) under "sdw-ui-train-run-v1".
'use strict';

const $ = (id) => document.getElementById(id);
const STORE_KEY = 'sdw-ui-settings-v1';
const MAX_INIT_SIDE = 2048; // photos larger than this are scaled down before upload
const POLL_MS = 500;
const MASK_COLOR = '#ff2d78'; // how the mask shows over the photo; exported as white

// ---------------------------------------------------------------------------------------------
// Fields of the generation forms: data-f name -> request key and type. `key: null` is kept in
// localStorage but not sent. `only` limits a field to one tab.
const FIELDS = [
  { f: 'prompt', key: 'prompt', type: 'str' },
  { f: 'negative', key: 'negative_prompt', type: 'str' },
  { f: 'sampler', key: 'sampler_name', type: 'str' },
  { f: 'scheduler', key: 'scheduler', type: 'str' },
  { f: 'steps', key: 'steps', type: 'int', label: 'Steps' },
  { f: 'cfg', key: 'cfg_scale', type: 'float', label: 'CFG scale' },
  { f: 'width', key: 'width', type: 'int', label: 'Width' },
  { f: 'height', key: 'height', type: 'int', label: 'Height' },
  { f: 'seed', key: 'seed', type: 'int', label: 'Seed' },
  { f: 'batch-count', key: 'n_iter', type: 'int', label: 'Batch count' },
  { f: 'batch-size', key: 'batch_size', type: 'int', label: 'Batch size' },
  { f: 'enable-hr', key: 'enable_hr', type: 'bool', only: 't2i' },
  { f: 'hr-scale', key: 'hr_scale', type: 'float', only: 't2i', label: 'Upscale by' },
  { f: 'hr-steps', key: 'hr_second_pass_steps', type: 'int', only: 't2i', label: 'Hires steps' },
  { f: 'hr-denoise', key: 'denoising_strength', type: 'float', only: 't2i', label: 'Denoising strength' },
  { f: 'denoise', key: 'denoising_strength', type: 'float', only: 'i2i', label: 'Denoising strength' },
  { f: 'resize-mode', key: 'resize_mode', type: 'int', only: 'i2i' },
  { f: 'mask-blur', key: 'mask_blur', type: 'float', only: 'i2i', label: 'Mask blur' },
  { f: 'fill', key: 'inpainting_fill', type: 'int', only: 'i2i' },
  { f: 'full-res', key: 'inpaint_full_res', type: 'bool01', only: 'i2i' },
  { f: 'brush', key: null, type: 'int', only: 'i2i' },
];

// The Train form's fields (kept in localStorage; the photos are not).
const TRAIN_FIELDS = ['name', 'instance', 'class', 'steps', 'resolution', 'rank', 'lr', 'validation-prompt', 'validation-every'];
const TRAIN_RUN_KEY = 'sdw-ui-train-run-v1';
const MAX_TRAIN_SIDE = 1024; // training photos larger than this are scaled down before upload
const TRAIN_POLL_MS = 1000;

const TABS = { t2i: 'txt2img', i2i: 'img2img' };
const state = {
  busy: false,
  runId: 0,
  lastSeed: { t2i: null, i2i: null },
  samplers: [], // [{name, aliases}]
  schedulers: [], // [{name, label}]
  loras: [],
  gallery: [],
  galleryShown: 0,
  lightbox: { items: [], index: 0 },
  pngInfo: null, // {dataUrl, params}
  modelBusy: false,
};

// ---------------------------------------------------------------------------------------------
// API

class ApiError extends Error {}

async function api(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(`Cannot reach the server (${e.message || e}).`);
  }
  const text = await res.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      if (res.ok) throw new ApiError(`${method} ${path}: the server's answer is not JSON.`);
    }
  }
  if (!res.ok) {
    let msg = data && (data.detail ?? data.errors ?? data.error);
    if (msg && typeof msg !== 'string') msg = JSON.stringify(msg);
    if (!msg) msg = text.trim().slice(0, 300) || res.statusText;
    throw new ApiError(`${msg} (HTTP ${res.status})`);
  }
  return data;
}

// ---------------------------------------------------------------------------------------------
// Small helpers

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function showError(target, message) {
  const node = typeof target === 'string' ? $(target) : target;
  if (!message) {
    node.hidden = true;
    node.textContent = '';
    return;
  }
  node.textContent = message;
  node.hidden = false;
}

function field(prefix, f) {
  return $(`${prefix}-${f}`);
}

function pngDataUrl(b64) {
  return b64.startsWith('data:') ? b64 : `data:image/png;base64,${b64}`;
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error('the file is not an image this browser can read'));
    img.src = src;
  });
}

function roundTo8(n) {
  return Math.max(64, Math.round(n / 8) * 8);
}

// A1111's parse_generation_parameters: prompt lines, "Negative prompt: ..." lines, then a last
// line of "Key: value, Key: "quoted, value"". Size becomes Size-1 / Size-2.
const RE_PARAM = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
function parseInfotext(text) {
  const out = {};
  const lines = (text || '').trim().split('\n');
  const last = lines.length ? lines[lines.length - 1] : '';
  const matches = [...last.matchAll(RE_PARAM)];
  if (matches.length >= 3) lines.pop();
  else matches.length = 0;
  const prompt = [];
  const negative = [];
  let inNegative = false;
  for (let line of lines) {
    if (line.trim().startsWith('Negative prompt:')) {
      inNegative = true;
      line = line.trim().slice('Negative prompt:'.length).trim();
    }
    (inNegative ? negative : prompt).push(line);
  }
  out.Prompt = prompt.join('\n');
  out['Negative prompt'] = negative.join('\n');
  for (const m of matches) {
    let v = m[2].trim();
    if (v.startsWith('"') && v.endsWith('"')) {
      try {
        v = JSON.parse(v);
      } catch {
        /* keep as written */
      }
    }
    out[m[1].trim()] = v;
  }
  const size = /^(\d+)x(\d+)$/.exec(out.Size || '');
  if (size) {
    out['Size-1'] = size[1];
    out['Size-2'] = size[2];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Tabs

function showTab(name) {
  if (!$(`panel-${name}`)) name = 'txt2img';
  for (const b of document.querySelectorAll('.tabs [data-tab]')) {
    const on = b.dataset.tab === name;
    b.setAttribute('aria-selected', String(on));
    $(`panel-${b.dataset.tab}`).hidden = !on;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, '', `#${name}`);
  if (name === 'gallery') loadGallery();
  if (name === 'train') drawLoss(); // a hidden canvas has no size to draw at
}

// ---------------------------------------------------------------------------------------------
// Building the two generation tabs from the template

function buildGenTab(prefix) {
  const panel = $(`panel-${TABS[prefix]}`);
  const frag = $('gen-template').content.cloneNode(true);
  for (const part of frag.querySelectorAll('[data-only]')) {
    if (part.dataset.only !== prefix) part.remove();
  }
  for (const node of frag.querySelectorAll('[data-f]')) node.id = `${prefix}-${node.dataset.f}`;
  frag.querySelector('.gen').classList.add(prefix);
  panel.append(frag);

  field(prefix, 'generate').addEventListener('click', () => generate(prefix));
  field(prefix, 'interrupt').addEventListener('click', () => control('interrupt', prefix));
  field(prefix, 'skip').addEventListener('click', () => control('skip', prefix));
  panel.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey) && e.target.closest('.gen')) {
      e.preventDefault();
      generate(prefix);
    }
  });
  field(prefix, 'seed-random').addEventListener('click', () => {
    field(prefix, 'seed').value = '-1';
    saveSettingsSoon();
  });
  field(prefix, 'seed-reuse').addEventListener('click', () => {
    if (state.lastSeed[prefix] != null) {
      field(prefix, 'seed').value = String(state.lastSeed[prefix]);
      saveSettingsSoon();
    }
  });
  field(prefix, 'swap').addEventListener('click', () => {
    const w = field(prefix, 'width');
    const h = field(prefix, 'height');
    [w.value, h.value] = [h.value, w.value];
    saveSettingsSoon();
  });
  field(prefix, 'lora-filter').addEventListener('input', () => renderLoras(prefix));
  panel.addEventListener('input', saveSettingsSoon);
  panel.addEventListener('change', saveSettingsSoon);
  field(prefix, 'results').addEventListener('click', (e) => onResultClick(e, prefix));
  if (prefix === 'i2i') setupEditor();
}

// ---------------------------------------------------------------------------------------------
// Settings in localStorage

let saveTimer = 0;
function saveSettingsSoon() {
  clearTimeout(saveTimer);
  saveTimer = setTimeout(saveSettings, 250);
}

function saveSettings() {
  const all = {};
  for (const prefix of Object.keys(TABS)) {
    const s = {};
    for (const d of FIELDS) {
      const node = field(prefix, d.f);
      if (!node) continue;
      s[d.f] = node.type === 'checkbox' ? node.checked : node.value;
    }
    all[prefix] = s;
  }
  all.train = {};
  for (const f of TRAIN_FIELDS) all.train[f] = $(`train-${f}`).value;
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(all));
  } catch {
    /* private mode or full: settings just are not kept */
  }
}

// All fields, or (onlySelects) just the <select>s, whose options come from the server.
function restoreSettings(onlySelects = false) {
  let all;
  try {
    all = JSON.parse(localStorage.getItem(STORE_KEY) || 'null');
  } catch {
    all = null;
  }
  if (!all) return;
  for (const prefix of Object.keys(TABS)) {
    const s = all[prefix] || {};
    for (const d of FIELDS) {
      const node = field(prefix, d.f);
      if (!node || !(d.f in s) || (onlySelects && node.tagName !== 'SELECT')) continue;
      if (node.type === 'checkbox') node.checked = Boolean(s[d.f]);
      else if (node.tagName === 'SELECT') setSelect(node, String(s[d.f]));
      else node.value = s[d.f];
    }
  }
  if (!onlySelects && all.train) {
    for (const f of TRAIN_FIELDS) if (f in all.train) $(`train-${f}`).value = all.train[f];
  }
}

// ---------------------------------------------------------------------------------------------
// Lists from the server: models, samplers, schedulers, LoRAs

function fillSelect(select, items, keep) {
  const previous = keep ?? select.value;
  select.replaceChildren(...items.map(([value, text]) => el('option', { value, text })));
  if (previous) setSelect(select, previous);
}

// Selects the option whose value (or text) equals `value`, ignoring case; false when none does.
function setSelect(select, value) {
  const want = String(value).toLowerCase();
  for (const o of select.options) {
    if (o.value.toLowerCase() === want || o.text.toLowerCase() === want) {
      select.value = o.value;
      return true;
    }
  }
  return false;
}

async function loadModels() {
  const [models, options] = await Promise.all([api('GET', 'sdapi/v1/sd-models'), api('GET', 'sdapi/v1/options')]);
  const select = $('model');
  const current = (options && options.sd_model_checkpoint) || '';
  fillSelect(
    select,
    (models || []).map((m) => [m.title, m.model_name || m.title]),
    current,
  );
  // A title gains its " [hash]" once the server has hashed the file: match on the name too.
  const bare = (t) => t.replace(/ \[[0-9a-f]+\]$/i, '');
  const same = (models || []).find((m) => bare(m.title) === bare(current));
  if (same && select.value !== same.title) select.value = same.title;
  select.dataset.current = select.value;
  if (!models || !models.length) $('model-status').textContent = 'No checkpoints found.';
}

async function loadSamplers() {
  const [samplers, schedulers] = await Promise.all([
    api('GET', 'sdapi/v1/samplers'),
    api('GET', 'sdapi/v1/schedulers'),
  ]);
  state.samplers = samplers || [];
  state.schedulers = schedulers || [];
  for (const prefix of Object.keys(TABS)) {
    const s = field(prefix, 'sampler');
    const hadValue = s.options.length > 0;
    fillSelect(s, state.samplers.map((x) => [x.name, x.name]));
    if (!hadValue && !setSelect(s, 'DPM++ 2M')) s.selectedIndex = 0;
    const sch = field(prefix, 'scheduler');
    fillSelect(
      sch,
      state.schedulers.map((x) => [x.label || x.name, x.label || x.name]),
      sch.value || 'Automatic',
    );
  }
}

async function loadLoras() {
  state.loras = (await api('GET', 'sdapi/v1/loras')) || [];
  for (const prefix of Object.keys(TABS)) renderLoras(prefix);
}

function renderLoras(prefix) {
  const list = field(prefix, 'loras');
  const filter = field(prefix, 'lora-filter').value.trim().toLowerCase();
  const items = state.loras.filter(
    (l) => !filter || l.name.toLowerCase().includes(filter) || (l.alias || '').toLowerCase().includes(filter),
  );
  if (!state.loras.length) {
    list.replaceChildren(el('li', { class: 'muted small', text: 'No LoRAs on the server.' }));
    return;
  }
  list.replaceChildren(
    ...items.map((l) =>
      el(
        'li',
        {},
        el('button', {
          type: 'button',
          class: 'lora',
          title: l.path || l.name,
          text: l.alias && l.alias !== l.name ? `${l.name} (${l.alias})` : l.name,
          onclick: () => insertAtCursor(field(prefix, 'prompt'), `<lora:${l.name}:1>`),
        }),
      ),
    ),
  );
}

function insertAtCursor(textarea, text) {
  const start = textarea.selectionStart ?? textarea.value.length;
  const end = textarea.selectionEnd ?? start;
  const before = textarea.value.slice(0, start);
  const after = textarea.value.slice(end);
  const pad = before && !/[\s,]$/.test(before) ? ' ' : '';
  textarea.value = before + pad + text + after;
  const pos = before.length + pad.length + text.length;
  textarea.focus();
  textarea.setSelectionRange(pos, pos);
  saveSettingsSoon();
}

async function loadLists() {
  showError('error', '');
  const results = await Promise.allSettled([loadModels(), loadSamplers(), loadLoras()]);
  const failed = results.filter((r) => r.status === 'rejected').map((r) => r.reason.message);
  if (failed.length) showError('error', `Could not load the server's lists: ${failed.join('; ')}`);
}

async function switchModel() {
  const select = $('model');
  const title = select.value;
  const previous = select.dataset.current;
  if (title === previous) return;
  state.modelBusy = true;
  select.disabled = true;
  updateBusy();
  $('model-status').textContent = `Loading ${title}…`;
  showError('error', '');
  try {
    await api('POST', 'sdapi/v1/options', { sd_model_checkpoint: title });
    select.dataset.current = title;
    $('model-status').textContent = '';
  } catch (e) {
    if (previous) select.value = previous;
    $('model-status').textContent = '';
    showError('error', `Could not switch the checkpoint: ${e.message}`);
  } finally {
    state.modelBusy = false;
    select.disabled = false;
    updateBusy();
  }
}

// ---------------------------------------------------------------------------------------------
// Generation

function collect(prefix) {
  const body = {};
  for (const d of FIELDS) {
    if (!d.key || (d.only && d.only !== prefix)) continue;
    const node = field(prefix, d.f);
    if (!node) continue;
    if (d.type === 'bool') body[d.key] = node.checked;
    else if (d.type === 'bool01') body[d.key] = node.value === '1';
    else if (d.type === 'str') body[d.key] = node.value;
    else {
      const n = d.type === 'int' ? parseInt(node.value, 10) : parseFloat(node.value);
      if (!Number.isFinite(n)) throw new Error(`${d.label || d.f}: enter a number.`);
      body[d.key] = n;
    }
  }
  if (prefix === 't2i' && !body.enable_hr) {
    delete body.hr_scale;
    delete body.hr_second_pass_steps;
    delete body.denoising_strength;
  }
  body.save_images = true;
  return body;
}

function updateBusy() {
  document.body.classList.toggle('busy', state.busy);
  for (const prefix of Object.keys(TABS)) {
    field(prefix, 'generate').disabled = state.busy || state.modelBusy;
  }
}

async function generate(prefix) {
  if (state.busy || state.modelBusy) return;
  const err = field(prefix, 'error');
  showError(err, '');
  let body;
  try {
    body = collect(prefix);
    if (prefix === 'i2i') {
      if (!editor.loaded) throw new Error('Choose a photo first (drop it on the img2img tab or tap to choose).');
      body.init_images = [editor.photo.toDataURL('image/png')];
      const mask = maskDataUrl();
      if (mask) body.mask = mask;
    }
  } catch (e) {
    showError(err, e.message);
    return;
  }
  const run = ++state.runId;
  state.busy = true;
  updateBusy();
  const started = performance.now();
  setProgress(prefix, 0, 'Starting…');
  pollProgress(prefix, run);
  let done = '';
  try {
    const path = prefix === 't2i' ? 'sdapi/v1/txt2img' : 'sdapi/v1/img2img';
    const res = await api('POST', path, body);
    done = renderResults(prefix, res, (performance.now() - started) / 1000);
  } catch (e) {
    showError(err, `Generation failed: ${e.message}`);
  } finally {
    state.busy = false;
    state.runId++;
    updateBusy();
    setProgress(prefix, null, done);
    const preview = field(prefix, 'preview');
    preview.hidden = true;
    preview.removeAttribute('src');
  }
}

async function control(what, prefix) {
  try {
    await api('POST', `sdapi/v1/${what}`);
  } catch (e) {
    showError(field(prefix, 'error'), `Could not ${what}: ${e.message}`);
  }
}

function setProgress(prefix, value, text) {
  const bar = field(prefix, 'progress');
  if (value == null) bar.value = 0;
  else bar.value = Math.max(0, Math.min(1, value));
  field(prefix, 'progress-text').textContent = text;
}

async function pollProgress(prefix, run) {
  await new Promise((r) => setTimeout(r, POLL_MS));
  while (state.runId === run) {
    try {
      const p = await api('GET', 'sdapi/v1/progress?skip_current_image=false');
      if (state.runId !== run) break;
      const s = (p && p.state) || {};
      const parts = [];
      if (s.sampling_steps) parts.push(`Step ${s.sampling_step}/${s.sampling_steps}`);
      if (s.job_count > 1) parts.push(`batch ${Math.min((s.job_no || 0) + 1, s.job_count)}/${s.job_count}`);
      if (p.progress > 0 && p.eta_relative > 0) parts.push(`ETA ${formatSeconds(p.eta_relative)}`);
      if (s.interrupted) parts.push('interrupting…');
      else if (s.skipped) parts.push('skipping…');
      if (!parts.length) parts.push(p.textinfo || 'Waiting…');
      setProgress(prefix, p.progress || 0, parts.join(' · '));
      if (p.current_image) {
        const preview = field(prefix, 'preview');
        const src = pngDataUrl(p.current_image);
        if (preview.getAttribute('src') !== src) preview.src = src;
        preview.hidden = false;
      }
    } catch {
      /* a missed progress poll is not worth an error line; the generation reports its own */
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

function formatSeconds(s) {
  if (s < 60) return `${Math.ceil(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

// Shows a finished generation; returns a line for the progress text.
function renderResults(prefix, res, seconds) {
  const box = field(prefix, 'results');
  let info = {};
  try {
    info = JSON.parse(res.info || '{}') || {};
  } catch {
    info = {};
  }
  const images = res.images || [];
  const infotexts = info.infotexts || [];
  const seeds = info.all_seeds || [];
  if (info.seed != null) state.lastSeed[prefix] = info.seed;
  const items = images.map((b64, i) => ({
    src: pngDataUrl(b64),
    infotext: infotexts[i] ?? infotexts[0] ?? '',
    name: `sdw-${seeds[i] ?? info.seed ?? i}.png`,
  }));
  box.replaceChildren(...items.map((item, i) => resultFigure(item, i)));
  if (!items.length) box.append(el('p', { class: 'muted', text: 'The server returned no images.' }));
  box.classList.toggle('single', items.length === 1);
  box.resultItems = items;
  box.dataset.gen = String(Number(box.dataset.gen || 0) + 1);
  return `${items.length} image${items.length === 1 ? '' : 's'} in ${seconds.toFixed(1)} s`;
}

function resultFigure(item, index) {
  return el(
    'figure',
    { class: 'result' },
    el('img', { src: item.src, alt: `Result ${index + 1}`, 'data-index': String(index), loading: 'lazy' }),
    el('figcaption', { class: 'infotext', text: item.infotext }),
    el(
      'div',
      { class: 'row small-buttons' },
      el('a', { class: 'button', href: item.src, download: item.name, text: 'Download' }),
      el('button', { type: 'button', 'data-act': 't2i', 'data-index': String(index), text: 'To txt2img' }),
      el('button', { type: 'button', 'data-act': 'i2i', 'data-index': String(index), text: 'To img2img' }),
    ),
  );
}

function onResultClick(e, prefix) {
  const box = field(prefix, 'results');
  const target = e.target.closest('[data-index]');
  if (!target || !box.resultItems) return;
  const item = box.resultItems[Number(target.dataset.index)];
  if (!item) return;
  if (target.tagName === 'IMG') openLightbox(box.resultItems, Number(target.dataset.index));
  else if (target.dataset.act) sendTo(target.dataset.act, item.infotext, item.src);
}

// ---------------------------------------------------------------------------------------------
// Filling a tab from an image's parameters (PNG Info, results, gallery)

function applyParams(prefix, p) {
  const warn = [];
  const set = (f, v) => {
    if (v === undefined || v === null || v === '') return;
    const node = field(prefix, f);
    if (node) node.value = String(v);
  };
  field(prefix, 'prompt').value = p.Prompt ?? '';
  field(prefix, 'negative').value = p['Negative prompt'] ?? '';
  set('steps', p.Steps);
  set('cfg', p['CFG scale']);
  set('seed', p.Seed);
  set('width', p['Size-1']);
  set('height', p['Size-2']);
  if (p.Sampler) {
    let sampler = String(p.Sampler);
    let schedule = p['Schedule type'];
    if (!findSampler(sampler)) {
      // Older A1111 infotexts name the schedule in the sampler: "DPM++ 2M Karras".
      for (const s of state.schedulers) {
        const label = s.label || s.name;
        if (sampler.toLowerCase().endsWith(` ${label.toLowerCase()}`) && findSampler(sampler.slice(0, -label.length - 1))) {
          sampler = sampler.slice(0, -label.length - 1);
          schedule = schedule || label;
        }
      }
    }
    const found = findSampler(sampler);
    if (found) field(prefix, 'sampler').value = found;
    else warn.push(`sampler "${sampler}" is not one the server has`);
    if (!setSelect(field(prefix, 'scheduler'), schedule || 'Automatic') && schedule) {
      warn.push(`schedule type "${schedule}" is not one the server has`);
    }
  }
  if (prefix === 't2i') {
    const hires = p['Hires upscale'] !== undefined || p['Hires steps'] !== undefined;
    field('t2i', 'enable-hr').checked = hires;
    if (hires) {
      set('hr-scale', p['Hires upscale']);
      set('hr-steps', p['Hires steps']);
      set('hr-denoise', p['Denoising strength']);
    }
  } else {
    set('denoise', p['Denoising strength']);
    set('mask-blur', p['Mask blur']);
  }
  saveSettingsSoon();
  showError(field(prefix, 'error'), warn.length ? `Note: ${warn.join('; ')}.` : '');
}

function findSampler(name) {
  const want = name.toLowerCase();
  for (const s of state.samplers) {
    if (s.name.toLowerCase() === want || (s.aliases || []).some((a) => String(a).toLowerCase() === want)) return s.name;
  }
  return null;
}

async function sendTo(prefix, infotext, imageSrc, params) {
  applyParams(prefix, params || parseInfotext(infotext));
  closeLightbox();
  showTab(TABS[prefix]);
  if (prefix === 'i2i' && imageSrc) {
    try {
      await loadInitImage(imageSrc);
    } catch (e) {
      showError(field('i2i', 'error'), `Could not load the image: ${e.message}`);
    }
  }
  field(prefix, 'prompt').focus();
}

// ---------------------------------------------------------------------------------------------
// img2img: the photo and the mask painted over it

const editor = { loaded: false, photo: null, mask: null, drawing: false, last: null };

function setupEditor() {
  editor.photo = field('i2i', 'photo');
  editor.mask = field('i2i', 'mask');
  const input = field('i2i', 'file');
  input.addEventListener('change', () => {
    if (input.files && input.files[0]) loadInitFile(input.files[0]);
    input.value = '';
  });
  dropTarget(field('i2i', 'drop'), loadInitFile);
  dropTarget(field('i2i', 'stage'), loadInitFile);
  field('i2i', 'mask-clear').addEventListener('click', clearMask);
  field('i2i', 'image-clear').addEventListener('click', () => {
    editor.loaded = false;
    field('i2i', 'stage').hidden = true;
    field('i2i', 'drop').hidden = false;
  });

  const m = editor.mask;
  const point = (e) => {
    const r = m.getBoundingClientRect();
    return { x: ((e.clientX - r.left) * m.width) / r.width, y: ((e.clientY - r.top) * m.height) / r.height, s: m.width / r.width };
  };
  m.addEventListener('pointerdown', (e) => {
    if (e.pointerType === 'mouse' && e.button !== 0) return;
    e.preventDefault();
    m.setPointerCapture(e.pointerId);
    editor.drawing = true;
    editor.last = point(e);
    stroke(editor.last, editor.last);
  });
  m.addEventListener('pointermove', (e) => {
    if (!editor.drawing) return;
    const p = point(e);
    stroke(editor.last, p);
    editor.last = p;
  });
  const stop = () => {
    editor.drawing = false;
  };
  m.addEventListener('pointerup', stop);
  m.addEventListener('pointercancel', stop);
  m.addEventListener('contextmenu', (e) => e.preventDefault());
}

function stroke(a, b) {
  const g = editor.mask.getContext('2d');
  const size = Number(field('i2i', 'brush').value) * a.s;
  g.save();
  g.globalCompositeOperation = field('i2i', 'erase').checked ? 'destination-out' : 'source-over';
  g.strokeStyle = MASK_COLOR;
  g.fillStyle = MASK_COLOR;
  g.lineCap = 'round';
  g.lineJoin = 'round';
  g.lineWidth = size;
  g.beginPath();
  if (a.x === b.x && a.y === b.y) {
    g.arc(a.x, a.y, size / 2, 0, Math.PI * 2);
    g.fill();
  } else {
    g.moveTo(a.x, a.y);
    g.lineTo(b.x, b.y);
    g.stroke();
  }
  g.restore();
}

function clearMask() {
  const m = editor.mask;
  m.getContext('2d').clearRect(0, 0, m.width, m.height);
}

// The mask as A1111 takes it: white (repaint) on black, the photo's size; null when empty.
function maskDataUrl() {
  const m = editor.mask;
  const { width: w, height: h } = m;
  const pixels = m.getContext('2d').getImageData(0, 0, w, h).data;
  let any = false;
  for (let i = 3; i < pixels.length; i += 4) {
    if (pixels[i]) {
      any = true;
      break;
    }
  }
  if (!any) return null;
  const canvas = () => Object.assign(document.createElement('canvas'), { width: w, height: h });
  const white = canvas(); // the strokes' coverage (antialiased edges included) in white
  const wg = white.getContext('2d');
  wg.drawImage(m, 0, 0);
  wg.globalCompositeOperation = 'source-in';
  wg.fillStyle = '#fff';
  wg.fillRect(0, 0, w, h);
  const out = canvas();
  const g = out.getContext('2d');
  g.fillStyle = '#000';
  g.fillRect(0, 0, w, h);
  g.drawImage(white, 0, 0);
  return out.toDataURL('image/png');
}

async function loadInitFile(file) {
  try {
    await loadInitImage(await readAsDataUrl(file));
  } catch (e) {
    showError(field('i2i', 'error'), `Could not load ${file.name || 'the image'}: ${e.message}`);
  }
}

async function loadInitImage(src) {
  const img = await loadImage(src);
  let w = img.naturalWidth;
  let h = img.naturalHeight;
  if (!w || !h) throw new Error('the image is empty');
  const scale = Math.min(1, MAX_INIT_SIDE / Math.max(w, h));
  w = Math.max(1, Math.round(w * scale));
  h = Math.max(1, Math.round(h * scale));
  for (const c of [editor.photo, editor.mask]) {
    c.width = w;
    c.height = h;
  }
  editor.photo.getContext('2d').drawImage(img, 0, 0, w, h);
  clearMask();
  editor.loaded = true;
  const stage = field('i2i', 'stage');
  stage.style.maxWidth = `calc(60vh * ${w / h})`; // tall photos: no taller than 60% of the screen
  stage.hidden = false;
  field('i2i', 'drop').hidden = true;
  showError(field('i2i', 'error'), '');
  // Keep the generation's longer side, follow the photo's aspect ratio.
  const wIn = field('i2i', 'width');
  const hIn = field('i2i', 'height');
  const side = Math.max(parseInt(wIn.value, 10) || 512, parseInt(hIn.value, 10) || 512);
  if (w >= h) {
    wIn.value = String(roundTo8(side));
    hIn.value = String(roundTo8((side * h) / w));
  } else {
    hIn.value = String(roundTo8(side));
    wIn.value = String(roundTo8((side * w) / h));
  }
  saveSettingsSoon();
}

function dropTarget(node, onFile) {
  node.addEventListener('dragover', (e) => {
    e.preventDefault();
    node.classList.add('dragging');
  });
  node.addEventListener('dragleave', () => node.classList.remove('dragging'));
  node.addEventListener('drop', (e) => {
    e.preventDefault();
    node.classList.remove('dragging');
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) onFile(file);
  });
}

// ---------------------------------------------------------------------------------------------
// PNG Info

function setupPngInfo() {
  const input = $('png-file');
  input.addEventListener('change', () => {
    if (input.files && input.files[0]) pngInfoFile(input.files[0]);
    input.value = '';
  });
  dropTarget($('png-drop'), pngInfoFile);
  $('png-send-t2i').addEventListener('click', () => {
    if (state.pngInfo) sendTo('t2i', state.pngInfo.info, null, state.pngInfo.params);
  });
  $('png-send-i2i').addEventListener('click', () => {
    if (state.pngInfo) sendTo('i2i', state.pngInfo.info, state.pngInfo.dataUrl, state.pngInfo.params);
  });
}

async function pngInfoFile(file) {
  showError('png-error', '');
  state.pngInfo = null;
  $('png-send-t2i').disabled = true;
  $('png-send-i2i').disabled = true;
  $('png-info').textContent = 'Reading…';
  $('png-params').replaceChildren();
  try {
    const dataUrl = await readAsDataUrl(file);
    const img = $('png-image');
    img.src = dataUrl;
    img.hidden = false;
    const res = (await api('POST', 'sdapi/v1/png-info', { image: dataUrl })) || {};
    const info = res.info || '';
    $('png-info').textContent = info || 'This image has no generation parameters.';
    if (!info) return;
    const params = { ...parseInfotext(info), ...(res.parameters || {}) };
    state.pngInfo = { dataUrl, info, params };
    $('png-params').replaceChildren(
      ...Object.entries(params)
        .filter(([k, v]) => v !== '' && v != null && !/^Size-\d$/.test(k))
        .map(([k, v]) =>
          el('tr', {}, el('th', { scope: 'row', text: k }), el('td', { text: typeof v === 'string' ? v : JSON.stringify(v) })),
        ),
    );
    $('png-send-t2i').disabled = false;
    $('png-send-i2i').disabled = false;
  } catch (e) {
    $('png-info').textContent = '';
    showError('png-error', `Could not read the image's parameters: ${e.message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Gallery

const GALLERY_PAGE = 120;

async function loadGallery() {
  showError('gallery-error', '');
  try {
    state.gallery = (await api('GET', 'sdw/v1/gallery')) || [];
  } catch (e) {
    showError('gallery-error', `Could not load the gallery: ${e.message}`);
    return;
  }
  state.galleryShown = 0;
  $('gallery').replaceChildren();
  renderGalleryPage();
}

function renderGalleryPage() {
  const items = state.gallery.slice(state.galleryShown, state.galleryShown + GALLERY_PAGE);
  const start = state.galleryShown;
  $('gallery').append(
    ...items.map((g, i) =>
      el(
        'figure',
        { class: 'result' },
        el('img', { src: g.url, alt: g.name, title: g.name, loading: 'lazy', 'data-index': String(start + i) }),
        el('figcaption', { class: 'infotext', text: g.infotext || g.name }),
      ),
    ),
  );
  state.galleryShown += items.length;
  $('gallery-more').hidden = state.galleryShown >= state.gallery.length;
  const n = state.gallery.length;
  $('gallery-count').textContent = n ? `${n} image${n === 1 ? '' : 's'}, newest first` : 'No saved images yet.';
}

// ---------------------------------------------------------------------------------------------
// Train: DreamBooth-LoRA runs. POST sdw/v1/train starts one (202); GET sdw/v1/train is polled
// while it is queued or running; POST sdw/v1/train/cancel stops it after its current step.

const train = {
  status: null, // the server's latest answer
  photos: [], // [{id, name, dataUrl (null while being prepared), width, height, from: [w, h] | null, node}]
  queue: Promise.resolve(), // photos are read and scaled one at a time (phones have little memory)
  photoErrors: [],
  nextId: 1,
  polling: false,
  posting: '', // 'start' or 'resume' while that request is on its way
  stopping: false, // Cancel was pressed: the run stops after its current step
  pollError: '',
  epoch: 0, // bumped by each POST: an older GET's answer is dropped
  validationKey: '',
  validationItems: [],
};

const isActive = (s) => Boolean(s) && (s.state === 'queued' || s.state === 'running');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const loraName = (s) => (s.lora ? s.lora.replace(/\.safetensors$/i, '') : s.name);

function setupTrain() {
  const input = $('train-files');
  input.addEventListener('change', () => {
    addTrainFiles([...(input.files || [])]);
    input.value = '';
  });
  const drop = $('train-drop');
  drop.addEventListener('dragover', (e) => {
    e.preventDefault();
    drop.classList.add('dragging');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('dragging'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('dragging');
    addTrainFiles([...((e.dataTransfer && e.dataTransfer.files) || [])]);
  });
  $('train-photos').addEventListener('click', (e) => {
    const b = e.target.closest('button[data-id]');
    if (!b) return;
    train.photos = train.photos.filter((p) => p.id !== Number(b.dataset.id));
    renderTrainPhotos();
  });
  $('train-start').addEventListener('click', () => startTraining(false));
  $('train-resume').addEventListener('click', () => startTraining(true));
  $('train-cancel').addEventListener('click', cancelTraining);
  $('train-use').addEventListener('click', useTrainedLora);
  $('train-validation').addEventListener('click', (e) => {
    const img = e.target.closest('img[data-index]');
    if (img) openLightbox(train.validationItems, Number(img.dataset.index));
  });
  const panel = $('panel-train');
  panel.addEventListener('input', saveSettingsSoon);
  panel.addEventListener('change', saveSettingsSoon);
  let resizeTimer = 0;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(drawLoss, 100);
  });
  const dark = window.matchMedia && matchMedia('(prefers-color-scheme: dark)');
  if (dark && dark.addEventListener) dark.addEventListener('change', drawLoss);
  renderTrainPhotos();
}

// The photos: every one is sent as a PNG data URL, scaled down to MAX_TRAIN_SIDE if larger.
function addTrainFiles(files) {
  train.photoErrors = [];
  showError('train-error', '');
  for (const file of files) {
    if (file.type && !file.type.startsWith('image/')) {
      train.photoErrors.push(`${file.name}: not an image`);
      continue;
    }
    const entry = { id: train.nextId++, name: file.name || 'photo', dataUrl: null, node: null };
    train.photos.push(entry);
    train.queue = train.queue.then(async () => {
      if (!train.photos.includes(entry)) return; // removed while waiting
      try {
        Object.assign(entry, await prepareTrainPhoto(file));
      } catch (e) {
        train.photos = train.photos.filter((p) => p !== entry);
        train.photoErrors.push(`${entry.name}: ${e.message}`);
      }
      renderTrainPhotos();
    });
  }
  renderTrainPhotos();
  return train.queue;
}

async function prepareTrainPhoto(file) {
  const src = await readAsDataUrl(file);
  const img = await loadImage(src);
  const w = img.naturalWidth;
  const h = img.naturalHeight;
  if (!w || !h) throw new Error('the image is empty');
  const scale = Math.min(1, MAX_TRAIN_SIDE / Math.max(w, h));
  if (scale === 1 && src.startsWith('data:image/png;')) return { dataUrl: src, width: w, height: h, from: null };
  const cw = Math.max(1, Math.round(w * scale));
  const ch = Math.max(1, Math.round(h * scale));
  const c = Object.assign(document.createElement('canvas'), { width: cw, height: ch });
  const g = c.getContext('2d');
  g.imageSmoothingEnabled = true;
  g.imageSmoothingQuality = 'high';
  g.drawImage(img, 0, 0, cw, ch); // <img> applies the photo's EXIF rotation
  return { dataUrl: c.toDataURL('image/png'), width: cw, height: ch, from: scale < 1 ? [w, h] : null };
}

function renderTrainPhotos() {
  $('train-photos').replaceChildren(
    ...train.photos.map((p) => {
      if (!p.node) {
        p.node = el(
          'li',
          { class: 'thumb loading' },
          el('img', { alt: p.name }),
          el('button', { type: 'button', class: 'remove', 'data-id': String(p.id), title: `Remove ${p.name}`, 'aria-label': `Remove ${p.name}`, text: '×' }),
        );
      }
      if (p.dataUrl && !p.shown) {
        p.shown = true;
        p.node.querySelector('img').src = p.dataUrl;
        p.node.classList.remove('loading');
        p.node.title = p.from ? `${p.name}: ${p.from[0]}×${p.from[1]}, sent as ${p.width}×${p.height}` : `${p.name}: ${p.width}×${p.height}`;
      }
      return p.node;
    }),
  );
  const ready = train.photos.filter((p) => p.dataUrl);
  const waiting = train.photos.length - ready.length;
  const bytes = ready.reduce((n, p) => n + p.dataUrl.length, 0);
  const size = bytes < 1 << 20 ? `${Math.ceil(bytes / 1024)} KiB` : `${(bytes / (1 << 20)).toFixed(1)} MiB`;
  const parts = [];
  if (ready.length) parts.push(`${ready.length} photo${ready.length === 1 ? '' : 's'} (${size} to upload)`);
  if (waiting) parts.push(`preparing ${waiting}…`);
  $('train-photo-count').textContent = parts.length ? parts.join(' · ') : 'No photos chosen.';
  if (train.photoErrors.length) showError('train-error', `Could not use: ${train.photoErrors.join('; ')}`);
}

// The request from the form (without photos); `name` replaces the form's name.
function trainBody(name) {
  const v = (f) => $(`train-${f}`).value.trim();
  const num = (f, label, int) => {
    const n = Number(v(f));
    if (v(f) === '' || !Number.isFinite(n) || (int && !Number.isInteger(n))) {
      throw new Error(`${label}: enter a ${int ? 'whole ' : ''}number.`);
    }
    return n;
  };
  const body = { name: name ?? v('name'), instance_prompt: v('instance') };
  if (!body.name) throw new Error('Enter a name for the LoRA (prompts use it as <lora:NAME:1>).');
  if (!body.instance_prompt) throw new Error('Enter the instance prompt, e.g. "photo of sks person".');
  if (v('class')) body.class_prompt = v('class');
  body.steps = num('steps', 'Steps', true);
  body.resolution = num('resolution', 'Resolution', true);
  body.rank = num('rank', 'Rank', true);
  body.learning_rate = num('lr', 'Learning rate', false);
  if (v('validation-prompt')) body.validation_prompt = v('validation-prompt');
  if (v('validation-every') !== '') body.validation_every = num('validation-every', 'Validation every N steps', true);
  return body;
}

function savedTrainRun() {
  try {
    return JSON.parse(localStorage.getItem(TRAIN_RUN_KEY) || 'null');
  } catch {
    return null;
  }
}

// Start (resume = false) or Resume, which sends the cancelled run's request again, without photos.
async function startTraining(resume) {
  if (train.posting) return;
  showError('train-error', '');
  train.posting = resume ? 'resume' : 'start';
  renderTrainButtons();
  try {
    let body;
    try {
      if (resume) {
        const name = (train.status && train.status.name) || '';
        const saved = savedTrainRun();
        body = saved && saved.name === name ? { ...saved } : trainBody(name);
        delete body.images;
      } else {
        body = trainBody();
        await train.queue; // photos still being prepared
        const photos = train.photos.filter((p) => p.dataUrl);
        if (!photos.length) throw new Error('Choose photos of the subject first (5–20 work well).');
        body.images = photos.map((p) => p.dataUrl);
      }
      body.resume = resume;
    } catch (e) {
      showError('train-error', e.message);
      return;
    }
    train.epoch++;
    let s;
    try {
      s = await api('POST', 'sdw/v1/train', body);
    } catch (e) {
      showError('train-error', `Could not ${resume ? 'resume' : 'start'} the run: ${e.message}`);
      return;
    }
    const { images, ...kept } = body;
    try {
      localStorage.setItem(TRAIN_RUN_KEY, JSON.stringify({ ...kept, resume: false }));
    } catch {
      /* Resume then falls back to the form */
    }
    train.stopping = false;
    renderTrain(s);
    pollTrain();
    if (window.matchMedia && matchMedia('(max-width: 800px)').matches) {
      $('train-live').scrollIntoView({ behavior: 'smooth', block: 'start' });
    }
  } finally {
    train.posting = '';
    renderTrainButtons();
  }
}

async function cancelTraining() {
  train.stopping = true;
  renderTrainState();
  renderTrainButtons();
  try {
    renderTrain(await api('POST', 'sdw/v1/train/cancel'));
    pollTrain();
  } catch (e) {
    train.stopping = false;
    renderTrainButtons();
    showError('train-error', `Could not cancel the run: ${e.message}`);
  }
}

async function loadTrainStatus() {
  try {
    renderTrain(await api('GET', 'sdw/v1/train'));
    pollTrain();
  } catch (e) {
    showError('train-error', `Could not read the training status: ${e.message}`);
  }
}

// Polls every TRAIN_POLL_MS while the run is queued or running; one loop at a time.
async function pollTrain() {
  if (train.polling) return;
  train.polling = true;
  try {
    while (isActive(train.status)) {
      await sleep(TRAIN_POLL_MS);
      const epoch = train.epoch;
      try {
        const s = await api('GET', 'sdw/v1/train');
        train.pollError = '';
        if (epoch === train.epoch) renderTrain(s);
      } catch (e) {
        train.pollError = e.message;
        renderTrainState();
      }
    }
  } finally {
    train.polling = false;
  }
}

function renderTrain(s) {
  const prev = train.status;
  s = s && s.state ? s : { state: 'idle', name: '', total: 0 };
  train.status = s;
  if (!isActive(s)) train.stopping = false;
  $('train-live').hidden = s.state === 'idle';
  renderTrainState();
  renderTrainButtons();
  const total = Number(s.total) || 0;
  $('train-progress').value = s.state === 'done' ? 1 : total ? Math.min(1, (Number(s.step) || 0) / total) : 0;

  const sameRun = prev && prev.name === s.name;
  if (s.state === 'failed' && !(sameRun && prev.state === 'failed')) {
    showError('train-error', `The run “${s.name}” failed: ${s.error || 'no reason given'}`);
  }
  const done = s.state === 'done';
  $('train-done').hidden = !done;
  if (done) {
    $('train-done-text').textContent = `The LoRA “${loraName(s)}” is ready${s.lora ? ` (${s.lora})` : ''}.`;
    if (sameRun && isActive(prev)) loadLoras().catch(() => {}); // it is in the LoRA lists now
  }

  const plot = $('train-loss-plot');
  plot.hidden = !s.loss_plot;
  if (s.loss_plot) plot.href = s.loss_plot;
  drawLoss();

  const urls = s.validation || [];
  const key = `${s.name}\n${urls.join('\n')}`;
  if (key !== train.validationKey) {
    train.validationKey = key;
    train.validationItems = [...urls].reverse().map((url) => {
      const m = /step-0*(\d+)\.png$/.exec(url);
      return { url, name: url.split('/').pop(), infotext: `${s.name}: validation images${m ? ` at step ${m[1]}` : ''}`, noSend: true };
    });
    $('train-validation').replaceChildren(
      ...train.validationItems.map((item, i) =>
        el(
          'figure',
          { class: 'result' },
          el('img', { src: item.url, alt: item.infotext, 'data-index': String(i) }),
          el('figcaption', { class: 'infotext', text: item.infotext.replace(/^.*?: /, '') }),
        ),
      ),
    );
    $('train-validation-title').hidden = !urls.length;
  }
}

function formatLoss(x) {
  return Math.abs(x) >= 0.001 || x === 0 ? x.toFixed(4) : x.toPrecision(3);
}

function renderTrainState() {
  const s = train.status || { state: 'idle' };
  const step = Number(s.step) || 0;
  const total = Number(s.total) || 0;
  const parts = [s.state];
  if (total) parts.push(`step ${step}/${total}`);
  const last = s.losses && s.losses[s.losses.length - 1];
  if (last) {
    const loss = Number.isFinite(last[2]) ? last[2] : last[1];
    if (Number.isFinite(loss)) parts.push(`loss ${formatLoss(loss)}`);
  } else if (s.state === 'running') {
    parts.push('preparing…');
  }
  if (train.stopping && isActive(s)) parts.push('stopping after this step…');
  if (train.pollError && isActive(s)) parts.push(`no answer from the server: ${train.pollError}`);
  const node = $('train-state');
  node.textContent = (s.name ? `${s.name}: ` : '') + parts.join(' · ');
  node.dataset.state = s.state;
  node.dataset.step = String(step);
}

function renderTrainButtons() {
  const s = train.status || {};
  const active = isActive(s);
  const start = $('train-start');
  start.disabled = Boolean(train.posting) || active;
  start.textContent = train.posting === 'start' ? 'Uploading…' : 'Start training';
  start.title = active ? 'A run is in progress: wait for it or cancel it' : '';
  $('train-cancel').hidden = !active;
  $('train-cancel').disabled = train.stopping;
  $('train-resume').hidden = s.state !== 'cancelled';
  $('train-resume').disabled = Boolean(train.posting);
}

async function useTrainedLora() {
  const s = train.status;
  if (!s || s.state !== 'done') return;
  showTab('txt2img');
  try {
    await loadLoras();
  } catch (e) {
    showError(field('t2i', 'error'), `Could not reload the LoRA list: ${e.message}`);
  }
  const prompt = field('t2i', 'prompt');
  const tag = `<lora:${loraName(s)}:1>`;
  if (prompt.value.includes(tag)) {
    prompt.focus();
    return;
  }
  prompt.setSelectionRange(prompt.value.length, prompt.value.length);
  insertAtCursor(prompt, tag);
}

// 1, 2 or 5 times a power of ten, about (hi - lo) / n.
function tickStep(lo, hi, n) {
  const raw = (hi - lo) / Math.max(1, n);
  const p = 10 ** Math.floor(Math.log10(raw));
  const f = raw / p;
  return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

// The loss plot: each step's loss as faint dots, the smoothed loss as a line.
function drawLoss() {
  const canvas = $('train-loss');
  const s = train.status;
  const rows = ((s && s.losses) || []).filter((r) => Array.isArray(r) && Number.isFinite(r[0]));
  canvas.hidden = !rows.length;
  const cssW = canvas.clientWidth;
  const cssH = canvas.clientHeight;
  if (!rows.length || !cssW || !cssH) return; // nothing yet, or the tab is hidden (drawn when shown)
  let y0 = Infinity;
  let y1 = -Infinity;
  for (const r of rows) {
    for (const v of [r[1], r[2]]) {
      if (Number.isFinite(v)) {
        y0 = Math.min(y0, v);
        y1 = Math.max(y1, v);
      }
    }
  }
  const dpr = Math.min(window.devicePixelRatio || 1, 3);
  const W = Math.round(cssW * dpr);
  const H = Math.round(cssH * dpr);
  if (canvas.width !== W || canvas.height !== H) {
    canvas.width = W;
    canvas.height = H;
  }
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, cssW, cssH);
  const css = getComputedStyle(document.documentElement);
  const color = (name, fallback) => css.getPropertyValue(name).trim() || fallback;
  const muted = color('--muted', '#777');
  const grid = color('--line', '#ccc');
  const accent = color('--accent', '#d9480f');
  g.font = '11px system-ui, sans-serif';

  if (!(y1 >= y0)) [y0, y1] = [0, 1]; // no finite loss at all
  if (y1 - y0 < 1e-12) {
    const pad = Math.abs(y0) * 0.1 || 0.1;
    y0 -= pad;
    y1 += pad;
  }
  const ys = tickStep(y0, y1, 4);
  y0 = Math.floor(y0 / ys) * ys;
  y1 = Math.ceil(y1 / ys) * ys;
  const decimals = Math.max(0, Math.min(8, -Math.floor(Math.log10(ys) + 1e-9)));
  const yTicks = [];
  for (let v = y0; v <= y1 + ys / 2; v += ys) yTicks.push(v);
  const xMax = Math.max(Number(s.total) || 0, rows[rows.length - 1][0], 1);
  const xs = Math.max(1, Math.round(tickStep(0, xMax, 5)));
  const xTicks = [];
  for (let v = 0; v <= xMax; v += xs) xTicks.push(v);

  const labels = yTicks.map((v) => v.toFixed(decimals));
  const ml = Math.ceil(Math.max(...labels.map((t) => g.measureText(t).width))) + 10;
  const mt = 22;
  const mr = 12;
  const mb = 22;
  const pw = cssW - ml - mr;
  const ph = cssH - mt - mb;
  if (pw < 20 || ph < 20) return;
  const X = (v) => ml + (v / xMax) * pw;
  const Y = (v) => mt + (1 - (v - y0) / (y1 - y0)) * ph;

  g.lineWidth = 1;
  g.strokeStyle = grid;
  g.fillStyle = muted;
  g.beginPath();
  g.textAlign = 'right';
  g.textBaseline = 'middle';
  yTicks.forEach((v, i) => {
    const y = Math.round(Y(v)) + 0.5;
    g.moveTo(ml, y);
    g.lineTo(ml + pw, y);
    g.fillText(labels[i], ml - 6, y);
  });
  g.textAlign = 'center';
  g.textBaseline = 'top';
  for (const v of xTicks) {
    const x = Math.round(X(v)) + 0.5;
    g.moveTo(x, mt);
    g.lineTo(x, mt + ph);
    g.fillText(String(v), x, mt + ph + 5);
  }
  g.stroke();
  g.strokeStyle = muted;
  g.beginPath();
  g.moveTo(ml + 0.5, mt);
  g.lineTo(ml + 0.5, mt + ph + 0.5);
  g.lineTo(ml + pw, mt + ph + 0.5);
  g.stroke();
  // Titles: the y axis at the top left, a legend at the top right (the x axis is the step).
  g.textBaseline = 'alphabetic';
  g.textAlign = 'left';
  g.fillText('loss', 2, 11);
  g.textAlign = 'right';
  g.fillText('smoothed', ml + pw, 11);
  const legend = ml + pw - g.measureText('smoothed').width - 6;
  g.fillText('per step', legend - 22, 11);
  const legendDots = legend - 22 - g.measureText('per step').width - 8;
  g.strokeStyle = accent;
  g.lineWidth = 2;
  g.beginPath();
  g.moveTo(legend - 14, 7.5);
  g.lineTo(legend, 7.5);
  g.stroke();
  g.fillStyle = accent;
  g.globalAlpha = 0.5;
  g.beginPath();
  g.arc(legendDots, 7.5, 2, 0, Math.PI * 2);
  g.fill();
  g.globalAlpha = 1;
  g.lineWidth = 1;

  // Raw loss: faint dots.
  const r = rows.length > 2000 ? 1 : 1.8;
  g.fillStyle = accent;
  g.globalAlpha = 0.3;
  g.beginPath();
  for (const row of rows) {
    if (!Number.isFinite(row[1])) continue;
    const x = X(row[0]);
    const y = Y(row[1]);
    g.moveTo(x + r, y);
    g.arc(x, y, r, 0, Math.PI * 2);
  }
  g.fill();
  // Smoothed loss: a line.
  g.globalAlpha = 1;
  g.strokeStyle = accent;
  g.lineWidth = 2;
  g.lineJoin = 'round';
  g.beginPath();
  let pen = false;
  for (const row of rows) {
    if (!Number.isFinite(row[2])) {
      pen = false;
      continue;
    }
    const x = X(row[0]);
    const y = Y(row[2]);
    if (pen) g.lineTo(x, y);
    else g.moveTo(x, y);
    pen = true;
  }
  if (rows.length === 1 && Number.isFinite(rows[0][2])) g.arc(X(rows[0][0]), Y(rows[0][2]), 2.5, 0, Math.PI * 2);
  g.stroke();
}

// ---------------------------------------------------------------------------------------------
// Lightbox

function openLightbox(items, index) {
  state.lightbox = { items, index };
  showLightboxItem();
  $('lightbox').hidden = false;
  $('lightbox-close').focus();
}

function showLightboxItem() {
  const { items, index } = state.lightbox;
  const item = items[index];
  if (!item) return;
  const src = item.src || item.url;
  $('lightbox-img').src = src;
  $('lightbox-img').alt = item.name || `Image ${index + 1}`;
  $('lightbox-info').textContent = item.infotext || '';
  $('lightbox-download').href = src;
  $('lightbox-download').setAttribute('download', (item.name || 'image.png').split('/').pop());
  // Validation grids have no generation parameters to send.
  for (const prefix of Object.keys(TABS)) $(`lightbox-send-${prefix}`).hidden = Boolean(item.noSend);
}

function closeLightbox() {
  $('lightbox').hidden = true;
  $('lightbox-img').removeAttribute('src');
}

function setupLightbox() {
  const box = $('lightbox');
  box.addEventListener('click', (e) => {
    if (e.target === box) closeLightbox();
  });
  $('lightbox-close').addEventListener('click', closeLightbox);
  for (const prefix of Object.keys(TABS)) {
    $(`lightbox-send-${prefix}`).addEventListener('click', () => {
      const item = state.lightbox.items[state.lightbox.index];
      if (item) sendTo(prefix, item.infotext, item.src || item.url);
    });
  }
  document.addEventListener('keydown', (e) => {
    if (box.hidden) return;
    const n = state.lightbox.items.length;
    if (e.key === 'Escape') closeLightbox();
    else if (e.key === 'ArrowRight' && n) {
      state.lightbox.index = (state.lightbox.index + 1) % n;
      showLightboxItem();
    } else if (e.key === 'ArrowLeft' && n) {
      state.lightbox.index = (state.lightbox.index + n - 1) % n;
      showLightboxItem();
    }
  });
  $('gallery').addEventListener('click', (e) => {
    const img = e.target.closest('img[data-index]');
    if (img) openLightbox(state.gallery, Number(img.dataset.index));
  });
}

// ---------------------------------------------------------------------------------------------
// Start

async function init() {
  buildGenTab('t2i');
  buildGenTab('i2i');
  setupPngInfo();
  setupLightbox();
  for (const b of document.querySelectorAll('.tabs [data-tab]')) {
    b.addEventListener('click', () => showTab(b.dataset.tab));
  }
  window.addEventListener('hashchange', () => showTab(location.hash.slice(1)));
  $('model').addEventListener('change', switchModel);
  $('model-refresh').addEventListener('click', loadLists);
  $('gallery-refresh').addEventListener('click', loadGallery);
  $('gallery-more').addEventListener('click', renderGalleryPage);
  // A pasted image goes to the open img2img or PNG Info tab.
  document.addEventListener('paste', (e) => {
    const file = [...((e.clipboardData && e.clipboardData.files) || [])].find((f) => f.type.startsWith('image/'));
    if (!file) return;
    const tab = document.querySelector('.tabs [aria-selected="true"]')?.dataset.tab;
    if (tab === 'img2img') loadInitFile(file);
    else if (tab === 'pnginfo') pngInfoFile(file);
    else if (tab === 'train') addTrainFiles([...e.clipboardData.files]);
    else return;
    e.preventDefault();
  });
  setupTrain();
  showTab(location.hash.slice(1) || 'txt2img');
  restoreSettings(); // the text and number fields at once; the selects again once filled
  updateBusy();
  await Promise.all([loadLists(), loadTrainStatus()]);
  restoreSettings(true);
  document.body.dataset.ready = 'true';
}

init();

// The dashboard's only way to the control plane: the public REST API, with the browser session
// (an HttpOnly cookie the page cannot read) plus the CSRF token the session answered, sent as
// X-CSRF-Token on every state-changing request. WebSockets get a single-use ticket first.
import { navigate } from './router.svelte.js';

export const session = $state({ user: null, checked: false });
let csrf = null;
let inflight = new AbortController(); // aborted at logout: no request outlives its session
let closing = false; // a logout is under way: the pages ask nothing more

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function failure(r) {
  let code = 'http_' + r.status, message = `${r.status} ${r.statusText}`;
  try {
    const doc = await r.json();
    if (doc && doc.error) ({ code, message } = doc.error);
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(r.status, code, message);
}

/** Call the API. `body`: an object (sent as JSON) or FormData. Answers the parsed JSON, null
 * for 204, or the Response itself with `raw`. Throws ApiError with the API's own message. */
export async function api(method, path, body, { raw = false } = {}) {
  if (closing) return new Promise(() => {}); // the page asking is about to go away
  const headers = {};
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  if (method !== 'GET' && csrf) headers['X-CSRF-Token'] = csrf;
  const r = await fetch(path, { method, headers, body: payload, credentials: 'same-origin',
    signal: inflight.signal });
  if (!r.ok) {
    const err = await failure(r);
    if (r.status === 401 && session.user) {
      session.user = null;
      navigate('/login');
    }
    throw err;
  }
  if (raw) return r;
  if (r.status === 204) return null;
  return r.json();
}

export function csrfToken() {
  return csrf;
}

function adopt(view) {
  csrf = view ? view.csrf_token : null;
  session.user = view;
}

export async function loadSession() {
  try {
    const r = await fetch('/v1/auth/session', { credentials: 'same-origin' });
    adopt(r.ok ? (await r.json()).session : null); // null: not logged in
  } catch {
    adopt(null);
  }
  session.checked = true;
}

export async function login(email, password) {
  adopt(await api('POST', '/v1/auth/session', { email, password }));
}

export async function signup(email, password, name) {
  adopt(await api('POST', '/v1/auth/session/signup', { email, password, name }));
}

export async function logout() {
  // What the pages had in flight is abandoned and they ask nothing more, so nothing is asked
  // with the session once it is gone; the login page shows only once the server has forgotten
  // the session (its answer clears the cookie: a login before it would lose its new cookie).
  const token = csrf;
  closing = true;
  inflight.abort();
  inflight = new AbortController();
  try {
    await fetch('/v1/auth/session', { method: 'DELETE', credentials: 'same-origin',
      headers: token ? { 'X-CSRF-Token': token } : {} });
  } catch { /* the network: the cookie is forgotten locally all the same below */ }
  closing = false;
  adopt(null);
  navigate('/login');
}

export async function switchTeam(teamId) {
  adopt(await api('POST', '/v1/auth/session/team', { team_id: teamId }));
}

/** A WebSocket to `path`, authenticated by a fresh single-use ticket as its first frame (no
 * secret in the URL). Resolves once the socket is open and the ticket sent. */
export async function socket(path) {
  const { ticket } = await api('POST', '/v1/auth/ws-ticket');
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${scheme}://${location.host}${path}`);
  ws.binaryType = 'arraybuffer';
  await new Promise((resolve, reject) => {
    ws.addEventListener('open', resolve, { once: true });
    ws.addEventListener('error', () => reject(new Error('the WebSocket did not open')), { once: true });
  });
  ws.send(JSON.stringify({ type: 'auth', token: ticket }));
  return ws;
}

/** Upload a File with progress (fetch cannot report upload progress): the streamed route,
 * `path` field first, then the file, read from disk as it is sent. */
export function upload(capsuleId, path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', `/v1/capsules/${capsuleId}/files/stream/write`);
    if (csrf) xhr.setRequestHeader('X-CSRF-Token', csrf);
    xhr.upload.onprogress = (ev) => ev.lengthComputable && onProgress(ev.loaded / ev.total);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) return resolve();
      let message = `${xhr.status} ${xhr.statusText}`, code = 'http_' + xhr.status;
      try { ({ code, message } = JSON.parse(xhr.responseText).error); } catch { /* keep */ }
      reject(new ApiError(xhr.status, code, message));
    };
    xhr.onerror = () => reject(new ApiError(0, 'network', 'the upload failed (network)'));
    const form = new FormData();
    form.append('path', path);
    form.append('file', file, file.name);
    xhr.send(form);
  });
}

let openapiDoc = null;
/** The API's own description: pages for optional features show only where routes exist. */
export async function openapi() {
  if (!openapiDoc) openapiDoc = await (await fetch('/openapi.json')).json();
  return openapiDoc;
}

// A small history router: the path is state, links navigate without reloading.
export const route = $state({ path: location.pathname, query: new URLSearchParams(location.search) });

export function navigate(to, { replace = false } = {}) {
  if (to === location.pathname + location.search) return;
  history[replace ? 'replaceState' : 'pushState']({}, '', to);
  sync();
}

function sync() {
  route.path = location.pathname;
  route.query = new URLSearchParams(location.search);
}

window.addEventListener('popstate', sync);

// Same-origin <a href="/..."> clicks become navigations (modifier keys keep the browser's way).
document.addEventListener('click', (ev) => {
  const a = ev.target instanceof Element ? ev.target.closest('a[href]') : null;
  if (!a || a.target || a.hasAttribute('download') || ev.defaultPrevented) return;
  if (ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith('/v1/') || url.pathname === '/openapi.json') return;
  ev.preventDefault();
  navigate(url.pathname + url.search);
});

/** Match `/capsules/:id` style patterns; the params, or null. */
export function match(pattern, path) {
  const p = pattern.split('/'), s = path.split('/');
  if (p.length !== s.length) return null;
  const params = {};
  for (let i = 0; i < p.length; i++) {
    if (p[i].startsWith(':')) params[p[i].slice(1)] = decodeURIComponent(s[i]);
    else if (p[i] !== s[i]) return null;
  }
  return params;
}

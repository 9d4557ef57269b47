// Run `fn` now and every `ms` while the page is visible; stop with the returned function.
export function poll(fn, ms) {
  let timer = null, stopped = false;
  async function tick() {
    if (stopped) return;
    if (document.visibilityState === 'visible') {
      try { await fn(); } catch { /* the page shows its own error */ }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  }
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

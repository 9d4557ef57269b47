// Vite builds the dashboard into build/, which the control plane serves at / (api/web.py).
// Everything comes from node_modules: no CDN at build or run time.
import { defineConfig } from 'vite';
import { svelte } from '@sveltejs/vite-plugin-svelte';

export default defineConfig({
  plugins: [svelte()],
  base: '/',
  build: {
    outDir: 'build',
    emptyOutDir: true,
    chunkSizeWarningLimit: 2000, // Swagger UI is one big chunk, loaded only on /docs
    sourcemap: false,
  },
  server: {
    // `npm run dev`: the API of a control plane on its default port
    proxy: { '/v1': { target: 'http://127.0.0.1:9725', ws: true }, '/openapi.json': 'http://127.0.0.1:9725' },
  },
});

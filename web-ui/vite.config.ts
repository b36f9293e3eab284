import { defineConfig } from "vite";

// Everything the box serves is built here: no CDN, no outside fonts or scripts.
export default defineConfig({
  base: "/",
  build: { outDir: "dist", assetsInlineLimit: 4096, sourcemap: false, target: "es2019" },
});

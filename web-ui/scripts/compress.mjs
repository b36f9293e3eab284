// Writes a Brotli (.br) and a gzip (.gz) copy beside every text or WebAssembly
// file of the build, so the box sends compressed bytes without compressing on
// each request (the portal picks one by the browser's Accept-Encoding).
import { readdirSync, readFileSync, writeFileSync, statSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { brotliCompressSync, gzipSync, constants } from "node:zlib";

const dist = join(dirname(fileURLToPath(import.meta.url)), "..", "dist");
const worth = /\.(js|css|html|wasm|svg|json)$/;

function walk(dir) {
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) walk(path);
    else if (worth.test(name)) squeeze(path);
  }
}

let before = 0, after = 0;
function squeeze(path) {
  const data = readFileSync(path);
  if (data.length < 1024) return;
  const br = brotliCompressSync(data, { params: { [constants.BROTLI_PARAM_QUALITY]: 11, [constants.BROTLI_PARAM_SIZE_HINT]: data.length } });
  const gz = gzipSync(data, { level: 9 });
  writeFileSync(`${path}.br`, br);
  writeFileSync(`${path}.gz`, gz);
  before += data.length;
  after += br.length;
}

walk(dist);
console.log(`compressed ${before} bytes to ${after} (brotli)`);

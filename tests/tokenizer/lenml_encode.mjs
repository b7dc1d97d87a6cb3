// Independent reference encoder for tokenizer.json parity tests: @lenml/tokenizers (a port of
// the transformers.js tokenizers) on Node.js.
//
//   node lenml_encode.mjs NODE_REFS_DIR TOKENIZER_DIR [--bench SECONDS] < lines.txt
//
// TOKENIZER_DIR holds tokenizer.json and tokenizer_config.json. Input: one JSON string per
// line (so \r, \t and lone newlines survive). Output: per input line, the ids of
// encode(text, {add_special_tokens: false}) as space-separated integers.
// With --bench: encodes all lines repeatedly for about SECONDS and prints one JSON object
// {"bytes": ..., "seconds": ...} instead.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";

const [refs, dir, ...rest] = process.argv.slice(2);
if (!refs || !dir) {
  console.error("usage: node lenml_encode.mjs NODE_REFS_DIR TOKENIZER_DIR [--bench SECONDS] < lines");
  process.exit(2);
}
const require = createRequire(path.join(refs, "package.json"));
const { TokenizerLoader } = require("@lenml/tokenizers");
const tokenizer = TokenizerLoader.fromPreTrained({
  tokenizerJSON: JSON.parse(readFileSync(path.join(dir, "tokenizer.json"), "utf8")),
  tokenizerConfig: JSON.parse(readFileSync(path.join(dir, "tokenizer_config.json"), "utf8")),
});
const lines = readFileSync(0, "utf8").split("\n").filter((l) => l.length > 0).map((l) => JSON.parse(l));
if (rest[0] === "--bench") {
  const seconds = Number(rest[1] || 3);
  let bytes = 0;
  const total = lines.reduce((n, l) => n + Buffer.byteLength(l, "utf8"), 0);
  for (const l of lines) tokenizer.encode(l, { add_special_tokens: false });  // warm up
  const t0 = process.hrtime.bigint();
  let elapsed = 0;
  do {
    for (const l of lines) tokenizer.encode(l, { add_special_tokens: false });
    bytes += total;
    elapsed = Number(process.hrtime.bigint() - t0) / 1e9;
  } while (elapsed < seconds);
  console.log(JSON.stringify({ bytes, seconds: elapsed }));
} else {
  const out = [];
  for (const l of lines) out.push(tokenizer.encode(l, { add_special_tokens: false }).join(" "));
  process.stdout.write(out.join("\n") + (out.length ? "\n" : ""));
}

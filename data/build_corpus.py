#!/usr/bin/env python3
"""Builds Rhine's multilingual corpus (German, French, Dutch, English) from text
that Debian packages ship.

Sources
  libreoffice-help-{de,fr,nl,en-us}  MPL-2.0. The same 2,560 help pages in the
      four languages: a *parallel* corpus. One page = one document; its id is
      the page's path, identical across languages, so parallel documents stay
      aligned (tokenizer fertility parity is measured on the same content).
  manpages-{de,fr,nl}, manpages (en)  Optional (--man), GPL/varied licences,
      not parallel: more varied prose for the larger corpus.

Pipeline: extract the help text of each page (headings and paragraphs of the
display area; scripts, navigation and code listings dropped), normalise
whitespace, drop paragraphs that are boilerplate (seen on more than
--boilerplate pages of a language) or have no letters, deduplicate documents
per language, keep the pages present in all four languages, and split
train / held-out by a hash of the page id (the same pages are held out in
every language).

Output (JSON Lines, one document per line, fields id, lang, source, licence, text):
  OUT/train/{de,fr,nl,en}.jsonl and OUT/heldout/{de,fr,nl,en}.jsonl
With --sample DIR it also writes the small committed sample:
  DIR/{de,fr,nl,en}.txt and DIR/heldout/{de,fr,nl,en}.txt, plain text with one
  document per blank-line-separated block, the same pages in every language.

Only the Python standard library is used; data/build_corpus.sh downloads and
unpacks the packages and calls this script.
"""
import argparse
import collections
import gzip
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import unicodedata

LANGS = {"de": "de", "fr": "fr", "nl": "nl", "en": "en-US"}  # Rhine code -> LibreOffice folder
BLOCK_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td", "th", "div"}
SKIP_TAGS = {"script", "style", "pre", "code", "noscript", "header", "aside", "nav"}


VOID_TAGS = {"br", "img", "meta", "input", "hr", "link", "area", "base", "col", "embed", "source", "wbr"}


class HelpPageParser(html.parser.HTMLParser):
    """Collects the text blocks inside <div id="DisplayArea">.

    Skipped: scripts, code listings, navigation, the "how to get" boxes, and
    hidden variants of switch elements (LibreOffice writes e.g. "Folie" for
    Impress and "Seite" for the default inside one span; only the variant
    whose id starts with "default" is kept).
    """

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.display_depth = 0  # >0 while inside DisplayArea (counts nested divs)
        self.skip_depth = 0     # >0 while inside a skipped element (counts all nested tags)
        self.blocks = []
        self.current = []

    def flush(self):
        text = re.sub(r"\s+", " ", "".join(self.current)).strip()
        if text:
            self.blocks.append(text)
        self.current = []

    def skipped(self, tag, attrs):
        cls = attrs.get("class") or ""
        if tag in SKIP_TAGS or any(c in cls for c in ("howtoget", "bascode", "relatedtopics")):
            return True
        return "hidden" in attrs and not (attrs.get("id") or "").startswith("default")

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if not self.display_depth:
            if tag == "div" and attrs.get("id") == "DisplayArea":
                self.display_depth = 1
            return
        if tag == "div":
            self.display_depth += 1
        if self.skip_depth:
            if tag not in VOID_TAGS:
                self.skip_depth += 1
            return
        if self.skipped(tag, attrs) and tag not in VOID_TAGS:
            self.skip_depth = 1
            return
        if tag in BLOCK_TAGS or tag == "br":
            self.flush()

    def handle_endtag(self, tag):
        if not self.display_depth or tag in VOID_TAGS:
            return
        if tag == "div":
            self.display_depth -= 1
        if self.skip_depth:
            self.skip_depth -= 1
            return
        if tag in BLOCK_TAGS:
            self.flush()

    def handle_data(self, data):
        if self.display_depth and not self.skip_depth:
            self.current.append(data)


def clean_text(s):
    # NFC, no control characters, no soft hyphens / zero-width spaces.
    s = unicodedata.normalize("NFC", s)
    s = "".join(ch for ch in s if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return re.sub(r"[ \t\u00a0]+", " ", s).strip()


def has_letters(s, minimum=3):
    return sum(ch.isalpha() for ch in s) >= minimum


def read_help_pages(help_root, folder):
    """Yields (page id, [paragraphs]) for one language."""
    base = os.path.join(help_root, folder)
    for dirpath, _, files in os.walk(os.path.join(base, "text")):
        for name in sorted(files):
            if not name.endswith(".html"):
                continue
            path = os.path.join(dirpath, name)
            parser = HelpPageParser()
            with open(path, encoding="utf-8", errors="replace") as f:
                parser.feed(f.read())
            parser.flush()
            paras = [clean_text(b) for b in parser.blocks]
            paras = [p for p in paras if p and has_letters(p)]
            # Drop consecutive duplicates (a heading repeated as a paragraph).
            dedup = []
            for p in paras:
                if not dedup or dedup[-1] != p:
                    dedup.append(p)
            yield os.path.relpath(path, base), dedup


def man_documents(man_root, lang):
    """Yields (id, text) of man pages rendered with groff (optional source)."""
    if not os.path.isdir(man_root):
        return
    for dirpath, _, files in os.walk(man_root):
        for name in sorted(files):
            if not name.endswith(".gz"):
                continue
            path = os.path.join(dirpath, name)
            try:
                with gzip.open(path, "rb") as f:
                    roff = f.read()
                if roff.startswith(b".so "):
                    continue  # an alias of another page
                out = subprocess.run(["groff", "-man", "-Tutf8", "-P", "-cbou", "-K", "utf8"],
                                     input=roff, capture_output=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired, EOFError):
                continue
            text = out.stdout.decode("utf-8", errors="replace")
            paras = [clean_text(p.replace("\n", " ")) for p in re.split(r"\n\s*\n", text)]
            paras = [p for p in paras if has_letters(p, 20)]
            if len(paras) >= 3:
                yield f"man/{lang}/{name[:-3]}", "\n".join(paras)


def heldout(page_id, percent):
    h = int(hashlib.sha256(page_id.encode()).hexdigest()[:8], 16)
    return h % 100 < percent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder where the .deb packages were unpacked (dpkg -x)")
    ap.add_argument("--out", required=True, help="output folder for train/ and heldout/ JSONL")
    ap.add_argument("--heldout-percent", type=int, default=5)
    ap.add_argument("--boilerplate", type=int, default=25,
                    help="drop paragraphs seen on more than this many pages of one language")
    ap.add_argument("--man", action="store_true", help="also add man pages (not parallel)")
    ap.add_argument("--sample", help="also write the small plain-text sample to this folder")
    ap.add_argument("--sample-bytes", type=int, default=300_000,
                    help="approximate size of the German training sample (other languages: same pages)")
    args = ap.parse_args()

    help_root = os.path.join(args.root, "usr/share/libreoffice/help")
    pages = {}
    for lang, folder in LANGS.items():
        if not os.path.isdir(os.path.join(help_root, folder)):
            sys.exit(f"[corpus] LibreOffice help for {lang} is missing, got no folder {help_root}/{folder}; "
                     "run data/build_corpus.sh, which downloads it")
        docs = dict(read_help_pages(help_root, folder))
        counts = collections.Counter(p for paras in docs.values() for p in set(paras))
        boiler = {p for p, c in counts.items() if c > args.boilerplate}
        pages[lang] = {pid: [p for p in paras if p not in boiler] for pid, paras in docs.items()}

    # Parallel pages: present and non-trivial in every language; deduplicated
    # per language by text (a page whose text equals an earlier page's is dropped
    # in all languages, so alignment is kept).
    ids = sorted(set.intersection(*(set(p) for p in pages.values())))
    seen = {lang: set() for lang in LANGS}
    aligned = []
    for pid in ids:
        texts = {lang: "\n".join(pages[lang][pid]) for lang in LANGS}
        if any(len(t) < 200 for t in texts.values()):
            continue
        if any(hashlib.sha1(texts[l].encode()).digest() in seen[l] for l in LANGS):
            continue
        for l in LANGS:
            seen[l].add(hashlib.sha1(texts[l].encode()).digest())
        aligned.append((pid, texts))

    stats = {}
    for split in ("train", "heldout"):
        os.makedirs(os.path.join(args.out, split), exist_ok=True)
    for lang in LANGS:
        files = {s: open(os.path.join(args.out, s, f"{lang}.jsonl"), "w", encoding="utf-8")
                 for s in ("train", "heldout")}
        n = collections.Counter()
        for pid, texts in aligned:
            split = "heldout" if heldout(pid, args.heldout_percent) else "train"
            rec = {"id": pid, "lang": lang, "source": "libreoffice-help", "licence": "MPL-2.0",
                   "text": texts[lang]}
            files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
            n[split + "_docs"] += 1
            n[split + "_bytes"] += len(texts[lang].encode())
        if args.man:
            man_root = os.path.join(args.root, "usr/share/man", "" if lang == "en" else lang)
            for mid, text in man_documents(man_root, lang):
                if lang == "en" and "/man/" in mid:
                    pass
                split = "heldout" if heldout(mid, args.heldout_percent) else "train"
                rec = {"id": mid, "lang": lang, "source": "debian-manpages", "licence": "see Debian copyright",
                       "text": text}
                files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
                n[split + "_docs"] += 1
                n[split + "_bytes"] += len(text.encode())
        for f in files.values():
            f.close()
        stats[lang] = dict(n)

    if args.sample:
        write_sample(aligned, args.sample, args.sample_bytes, args.heldout_percent)
    json.dump(stats, sys.stdout, indent=1)
    print()


def write_sample(aligned, folder, budget, percent):
    """The committed sample: the same pages in every language, plain text."""
    os.makedirs(os.path.join(folder, "heldout"), exist_ok=True)
    # A deterministic spread over the whole help (not just one module).
    order = sorted(aligned, key=lambda a: hashlib.sha256(a[0].encode()).hexdigest())
    train, held = [], []
    size_train = size_held = 0
    for pid, texts in order:
        n = len(texts["de"].encode())
        if heldout(pid, percent):
            if size_held < budget // 6:
                held.append((pid, texts))
                size_held += n
        elif size_train < budget:
            train.append((pid, texts))
            size_train += n
    for lang in LANGS:
        for docs, path in ((train, os.path.join(folder, f"{lang}.txt")),
                           (held, os.path.join(folder, "heldout", f"{lang}.txt"))):
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n\n".join(t[lang] for _, t in docs) + "\n")
    with open(os.path.join(folder, "ids.txt"), "w", encoding="utf-8") as f:
        f.write("# page ids of the sample, in order (train, then heldout)\n")
        for pid, _ in train:
            f.write(f"train {pid}\n")
        for pid, _ in held:
            f.write(f"heldout {pid}\n")


if __name__ == "__main__":
    main()

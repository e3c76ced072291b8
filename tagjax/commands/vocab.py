"""The ``tagjax vocab`` command: build, show and look up hashtag vocabularies (the work is tagjax.vocab);
``rebuild-data`` rebuilds the package data from WordNet 3.0 (tagjax.wordnet)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from tagjax import hashtags as H
from tagjax.commands import _args, paths
from tagjax.errors import UserError
from tagjax.vocab import MODES, Canonicalizer, Vocabulary, build_vocabulary, read_tag_counts

# Old flag spellings, still accepted with a warning (tagjax.cli).
ALIASES = {"--out": "--output", "--out-dir": "--output"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_command", metavar="ACTION", required=True)
    b = sub.add_parser(
        "build",
        help="hashtag counts -> vocab.json",
        description="Build a vocabulary from hashtag counts (or WordNet alone).",
        formatter_class=_args.HelpFormatter,
        epilog=read_tag_counts.__doc__.split("\n", 1)[1].replace("``", ""),
    )
    b.add_argument(
        "--counts",
        help="hashtag counts (.tsv/.json/.jsonl, optionally .gz); omit to build from WordNet alone",
    )
    b.add_argument(
        "--mode",
        choices=MODES,
        default="nouns",
        help="which hashtags become labels (see docs/vocabulary.md)",
    )
    b.add_argument(
        "--top-k", type=int, default=None, help="keep this many labels (17000, 8500, ...)"
    )
    b.add_argument(
        "--min-count", type=int, default=1, help="drop canonical hashtags seen fewer times"
    )
    b.add_argument(
        "--sense-policy",
        choices=H.SENSE_POLICIES,
        default="all",
        help="'first' collapses each hashtag to WordNet's first sense (docs/vocabulary.md, step 4)",
    )
    b.add_argument("--no-visual-filter", action="store_true", help="keep every noun")
    b.add_argument(
        "--visual-threshold",
        type=float,
        default=H.VisualRule.threshold,
        help="share of a noun's senses under physical entity needed to keep it",
    )
    b.add_argument(
        "--meta-hashtags",
        default="default",
        help="'default' (package list), 'none', or a word-list file",
    )
    b.add_argument(
        "--split-compounds",
        action="store_true",
        help="split unknown forms into known nouns (#sunsetbeach -> sunset + beach)",
    )
    _args.add_output(b, "output vocabulary file (.json, or .json.gz)", required=True)
    _args.add_json(b, "print the vocabulary's summary (settings, statistics) as one JSON document")
    _args.add_progress(b)
    s = sub.add_parser(
        "show",
        help="summarize a vocabulary and list its labels",
        formatter_class=_args.HelpFormatter,
    )
    s.add_argument("vocab", help="vocab.json, a dataset directory, or a built-in name (in1k)")
    s.add_argument("--limit", type=int, default=25, help="labels to list (0 = all)")
    _args.add_json(s, "print the listed label entries as JSON Lines (the summary goes to stderr)")
    _args.add_progress(s, draws_bars=False)
    lk = sub.add_parser(
        "lookup",
        formatter_class=_args.HelpFormatter,
        help="explain what happens to hashtags",
        description="For each hashtag: its label (id, name, synsets) or why it is dropped.",
    )
    lk.add_argument(
        "tags", nargs="*", help="hashtags ('-' reads whitespace-separated tags from stdin)"
    )
    lk.add_argument(
        "--vocab", default="in1k", help="vocab.json, dataset dir, or built-in name (default in1k)"
    )
    lk.add_argument(
        "--drop-ancestors",
        action="store_true",
        help="also show the labels kept for all tags as one post under the specificity option",
    )
    lk.add_argument(
        "--split-compounds",
        action="store_true",
        help="split unknown forms into known nouns (#sunsetbeach -> sunset + beach)",
    )
    _args.add_json(
        lk,
        "one JSON object per hashtag (JSON Lines); the 'as one post' line goes to stderr",
    )
    _args.add_progress(lk, draws_bars=False)
    r = sub.add_parser(
        "rebuild-data",
        help="rebuild tagjax's package data from WordNet 3.0",
        formatter_class=_args.HelpFormatter,
    )
    r.add_argument(
        "--output",
        "-o",
        type=paths.path,
        dest="out_dir",
        default=None,
        metavar="DIR",
        help="data directory to write (default: the installed package's data directory)",
    )
    _args.add_json(r, "print what was written as one JSON document")
    _args.add_progress(r, draws_bars=False)


def run(args) -> int:
    return {
        "build": _run_build,
        "show": _run_show,
        "lookup": _run_lookup,
        "rebuild-data": _run_rebuild,
    }[args.vocab_command](args)


def _run_build(args) -> int:
    counts = read_tag_counts(args.counts) if args.counts else None
    visual = H.VisualRule(threshold=args.visual_threshold, enabled=not args.no_visual_filter)
    v = build_vocabulary(
        counts,
        mode=args.mode,
        top_k=args.top_k,
        min_count=args.min_count,
        sense_policy=args.sense_policy,
        visual=visual,
        meta_hashtags=args.meta_hashtags,
        split_compounds=args.split_compounds,
        source=str(args.counts or "wordnet"),
        progress=args.progress,
    )
    v.save(args.output)
    if args.json:
        _args.print_json(args, {"output": str(args.output), **_summary(v)})
        return 0
    _print_summary(v)
    print(f"wrote {args.output}")
    return 0


def _summary(v: Vocabulary) -> dict:
    return {
        "num_labels": v.num_labels,
        "fingerprint": v.fingerprint(),
        "settings": v.settings,
        "stats": v.stats,
    }


def _print_summary(v: Vocabulary) -> None:
    st, se = v.stats, v.settings
    print(
        f"vocabulary: {v.num_labels} labels, mode {se.get('mode')}, fingerprint {v.fingerprint()}, "
        f"sense policy {se.get('hashtags', {}).get('sense_policy')}"
    )
    if st.get("input_forms") is not None:
        frac = st.get("kept_fraction")
        print(
            f"input: {st['input_forms']} hashtag forms, {st['input_count']} occurrences; "
            f"candidate labels {st.get('candidate_labels')}; kept "
            f"{'n/a' if frac is None else f'{frac:.1%}'} of occurrences"
        )
    if "in1k_synsets_covered" in st:
        print(f"ImageNet-1k synsets covered: {st['in1k_synsets_covered']} of 1000")
    for reason, d in st.get("dropped", {}).items():
        print(f"  dropped {reason:16s} {d['forms']:>9} forms {d['count']:>12} occurrences")


def _run_show(args) -> int:
    v = Vocabulary.load(args.vocab)
    _print_summary(v)
    n = v.num_labels if args.limit == 0 else min(args.limit, v.num_labels)
    if args.json:  # the summary above went to stderr (tagjax.cli redirects prints under --json)
        _args.print_json_lines(args, v.to_json()["labels"][:n])
        return 0
    for i in range(n):
        aliases = ", ".join(f"{a}:{c}" for a, c in list(v.aliases_of(i).items())[:6])
        print(
            f"{i:>6}  {v.name_of(i):24s} {v.count_of(i):>10}  {' '.join(v.synsets_of(i))}  [{aliases}]"
        )
    return 0


def _iter_lookup_tags(tags: list[str]) -> Iterator[str]:
    for t in tags:
        if t == "-":
            for line in sys.stdin:
                yield from line.split()
        else:
            yield t


def _run_lookup(args) -> int:
    v = Vocabulary.load(args.vocab)
    canon = Canonicalizer(
        v,
        drop_ancestors=args.drop_ancestors,
        split_compounds=True if args.split_compounds else None,
    )
    tags = list(_iter_lookup_tags(args.tags))
    if not tags:
        raise UserError(
            "give hashtags to look up, e.g. `tagjax vocab lookup dogs tbt sunset` ('-' = stdin)."
        )
    if args.json:
        _args.print_json_lines(args, (canon.explain(tag) for tag in tags))
    else:
        for tag in tags:
            e = canon.explain(tag)
            if "labels" in e:
                for lab in e["labels"]:
                    print(
                        f"{tag}\t-> label {lab['id']} #{lab['name']}\tsynsets: {', '.join(lab['synsets'])}"
                    )
            else:
                senses = "; ".join(
                    f"{', '.join(m['synsets'][:4])}{' ...' if len(m['synsets']) > 4 else ''}"
                    f" (visual share {m['visual_share']})"
                    for m in e["meanings"]
                )
                print(f"{tag}\t-> dropped: {e['dropped']}" + (f"\t{senses}" if senses else ""))
    result = canon(tags)
    names = [f"#{v.name_of(i)}" for i in result.label_ids]
    drops = ", ".join(f"{r}={n}" for r, n in sorted(result.dropped.items()))
    print(
        f"as one post: {' '.join(names) or '(no labels)'}"
        + (f"; dropped {drops}" if drops else ""),
        file=sys.stderr if args.json else sys.stdout,
    )
    return 0


def _run_rebuild(args) -> int:
    from tagjax import wordnet  # nltk: only this action reads WordNet itself

    info = wordnet.rebuild_package_data(args.out_dir)
    if args.json:
        _args.print_json(args, info)
        return 0
    print(
        f"WordNet 3.0: {info['synsets']} noun synsets, {info['forms']} hashtag forms; "
        f"in1k vocabulary: {info['in1k_labels']} labels"
    )
    for name, size in info["files"].items():
        print(f"  {name}: {size / 1e6:.2f} MB")
    return 0

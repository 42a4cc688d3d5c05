"""`python -m data.tfds_builders build NAME --src DIR --out DIR`: builds a VQA benchmark from local
files into array_record (no TensorFlow); read it back with tfds.data_source(NAME, split=..., data_dir=OUT)
or train on it with the data path `tfds:NAME:SPLIT`."""
import argparse

from data.errors import cli_errors


def main(argv=None):
  from data import tfds_builders as ours
  p = argparse.ArgumentParser(prog="python -m data.tfds_builders", description=__doc__)
  sub = p.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser(
      "build", help="build one dataset from local source files",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="source layouts:\n" + "\n".join(f"  {n}: {c.MANUAL_DOWNLOAD_INSTRUCTIONS}"
                                             for n, c in sorted(ours.BUILDERS.items())))
  b.add_argument("name", choices=sorted(ours.BUILDERS))
  b.add_argument("--src", required=True,
                 help="local copy of the source (HF parquet export or original JSON + images)")
  b.add_argument("--out", required=True, help="TFDS data dir to write")
  args = p.parse_args(argv)
  with cli_errors():
    builder = ours.build(args.name, args.src, args.out)
  for split, info in sorted(builder.info.splits.items()):
    print(f"{args.name}/{split}: {info.num_examples} examples")
  print(f"written to {builder.data_dir}")


if __name__ == "__main__":
  main()

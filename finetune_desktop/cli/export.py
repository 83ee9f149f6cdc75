"""`finetune-desktop export RUN_OR_MODEL --format gguf|hf|peft --out PATH [--gguf-type f32|f16|q8_0]`

gguf: one file for llama.cpp, Ollama and LM Studio (a run's LoRA is already merged), with an
Ollama Modelfile beside it. hf: a copy of the Hugging Face model folder (transformers). peft: a
copy of a LoRA run's adapter folder (PEFT)."""
from __future__ import annotations

from .common import MODEL_HELP

NAME = "export"


def register(sub) -> None:
    e = sub.add_parser(NAME, help="write a model as a GGUF file (llama.cpp, Ollama, LM Studio), an HF folder "
                                  "or a PEFT adapter", description=__doc__.split("\n\n", 1)[1])
    e.add_argument("model", metavar="RUN_OR_MODEL", help=MODEL_HELP)
    e.add_argument("--format", required=True, choices=["gguf", "hf", "peft"],
                   help="gguf: one file for llama.cpp/Ollama/LM Studio; hf: the transformers folder; "
                        "peft: a LoRA run's adapter folder")
    e.add_argument("--out", required=True, metavar="PATH",
                   help="gguf: the .gguf file to write (or a folder for model.gguf); hf/peft: a new folder")
    e.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f32",
                   help="number format of the GGUF matrices (norms and biases stay f32); q8_0 is about a "
                        "quarter of f32's size")
    e.set_defaults(run=run)


def run(args) -> int:
    from ..interop.folders import export_hf, export_peft

    if args.format == "gguf":
        from ..interop.gguf_export import export_gguf

        r = export_gguf(args.model, args.out, args.gguf_type)
        size = r.path.stat().st_size
        print(f"wrote {r.path} ({r.architecture}, {r.gguf_type}, {r.num_tensors} tensors, {size / 1e6:.1f} MB)")
        if r.modelfile is not None:
            print(f"wrote {r.modelfile} (Ollama: cd {r.modelfile.parent} && ollama create NAME -f Modelfile)")
        for n in r.notes:
            print(f"note: {n}")
        return 0
    if args.gguf_type != "f32":
        print("note: --gguf-type applies to --format gguf only; ignored")
    out = export_hf(args.model, args.out) if args.format == "hf" else export_peft(args.model, args.out)
    print(f"wrote {out}")
    return 0

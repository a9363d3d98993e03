"""lm-evaluation-harness reads a peftlab adapter as it reads a PEFT one (`--model hf --model_args
pretrained=BASE,peft=RUN`), with the same numbers as the merged model (`peftlab merge RUN`).

    pip install lm_eval
    python benchmarks/lm_eval_check.py --run RUN --test TEST.jsonl

The task is written here and reads a local file, so nothing is downloaded: each held-out
conversation's question and its human-written answer as one text, scored by rolling
log-likelihood (word perplexity and bits per byte, as lm-eval's wikitext task scores text). Every run goes through
`lm_eval.simple_evaluate`, the function the `lm_eval` command calls.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

TASK = """task: peftlab_answers
dataset_path: json
dataset_kwargs:
  data_files: {{test: "{data}"}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "Question: {{{{question}}}}\\nAnswer: {{{{answer}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a peftlab run or adapter directory of a causal LM")
    parser.add_argument("--test", required=True, help="held-out conversations (.jsonl of messages rows)")
    parser.add_argument("--limit", type=int, default=40)
    args = parser.parse_args()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from peftlab.run import merge_trained, read_record

    work = Path(tempfile.mkdtemp())
    rows = [json.loads(line) for line in Path(args.test).read_text().splitlines() if line.strip()][: args.limit]
    docs = [{"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in rows]
    (work / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (work / "tasks").mkdir()
    (work / "tasks" / "peftlab_answers.yaml").write_text(TASK.format(data=work / "docs.jsonl"))
    merge_trained(args.run, work / "merged")
    base = read_record(args.run).config.model.path
    results = {}
    for name, model_args in (("base + peftlab adapter (peft=RUN)", f"pretrained={base},peft={args.run}"),
                             ("merged (peftlab merge)", f"pretrained={work / 'merged'}"),
                             ("base alone", f"pretrained={base}")):
        out = lm_eval.simple_evaluate(model="hf", model_args=model_args + ",dtype=float32", tasks=["peftlab_answers"],
                                      task_manager=TaskManager(include_path=str(work / "tasks")), device="cpu",
                                      batch_size=4)
        results[name] = {k: v for k, v in out["results"]["peftlab_answers"].items() if k.split(",")[0] in ("word_perplexity", "bits_per_byte")}
        print(f"{name}: {results[name]}", flush=True)
    Path(__file__).with_name("lm_eval.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

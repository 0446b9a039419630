"""Step-0 DPO loss and rewards on GSM8K pairs with the right reference (the starting policy) and the usual LoRA one
(adapter disabled = the residual alone). Usage: python docs/study/dpo/reference_check.py OUT N (docs/dpo.md)."""
import json, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
from qpissa.quant import compute_in_fp32, keep_4bit_layout_trainable
from qpissa.preference import build_pairs, collate_pairs
from qpissa.train.preference import sequence_logps, preference_loss
torch.set_num_threads(1)
out = Path(sys.argv[1]); n = int(sys.argv[2])
tok = AutoTokenizer.from_pretrained(out / "residual")
rows = [json.loads(l) for l in open("tests/fixtures/gsm8k-dpo/test.jsonl")][:n]
pairs = build_pairs(rows, tok, ("prompt", "chosen", "rejected"), 512)
m = AutoModelForCausalLM.from_pretrained(out / "residual", dtype=torch.float32); keep_4bit_layout_trainable(m); compute_in_fp32(m)
m = PeftModel.from_pretrained(m, out / "adapter").eval()
b = collate_pairs(pairs, tok.pad_token_id)
with torch.no_grad():
    start, L, _ = sequence_logps(m, b)
    with m.disable_adapter():
        dis, _, _ = sequence_logps(m, b)
for name, ref in (("starting policy", start), ("adapter disabled", dis)):
    loss, st = preference_loss(start, ref, L, "dpo", 0.1)
    print(f"{name}: loss {loss.mean():.4f} rewards_chosen {st['rewards_chosen'].mean():.3f} rejected {st['rewards_rejected'].mean():.3f} accuracy {st['rewards_accuracy'].mean():.3f}")

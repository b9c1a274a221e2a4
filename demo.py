"""A short demonstration of the encoder on the packaged checkpoint: mean-pooled sentence
embeddings and their cosine similarities."""
import torch

from base_bert import default_checkpoint_path, from_pretrained
from bert import mean_pool
from tokenizer import BertTokenizer

SENTENCES = ["A man is playing a guitar.", "Someone plays an instrument on stage.",
             "The stock market fell sharply today.", "Shares dropped at the close of trading."]


def main() -> None:
    folder = default_checkpoint_path()
    model, tok = from_pretrained(folder).eval(), BertTokenizer.from_pretrained(folder)
    enc = tok.encode(SENTENCES)
    with torch.inference_mode():
        emb = mean_pool(model(**enc.as_kwargs()).last_hidden_state, enc.attention_mask)
    emb = torch.nn.functional.normalize(emb, dim=-1)
    sims = emb @ emb.T
    for i, sentence in enumerate(SENTENCES):
        print(f"{sentence:<40} " + " ".join(f"{s:5.2f}" for s in sims[i].tolist()))


if __name__ == "__main__":
    main()

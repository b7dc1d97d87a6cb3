// Built only against LibTorch 2.x (the PyTorch wheel): one process that loads both
// libsentencepiece and LibTorch, trains and runs a SentencePiece model and computes with
// ATen. Against Debian's LibTorch 1.13 the same program dies before main (the protobuf
// clash: Debian's libsentencepiece exports its own protobuf-lite, Debian's libtorch loads the
// system libprotobuf); the wheel's LibTorch keeps its protobuf private, so they coexist.
#include <ATen/ops/ones.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

int main() {
  const auto dir = std::filesystem::temp_directory_path() / "rhine_spm_with_torch";
  std::filesystem::create_directories(dir);
  const std::string text = (dir / "t.txt").string(), prefix = (dir / "m").string();
  std::ofstream(text) << "Der schnelle braune Fuchs springt über den faulen Hund.\n"
                         "Le renard brun rapide saute par-dessus le chien paresseux.\n"
                         "De snelle bruine vos springt over de luie hond.\n";
  const auto st = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + text + " --model_prefix=" + prefix + " --vocab_size=60 --model_type=bpe --minloglevel=2");
  if (!st.ok()) return std::fprintf(stderr, "train: %s\n", st.ToString().c_str()), 1;
  sentencepiece::SentencePieceProcessor sp;
  if (!sp.Load(prefix + ".model").ok()) return 1;
  std::vector<int> ids;
  if (!sp.Encode("De snelle vos", &ids).ok() || ids.empty()) return 1;
  const float sum = at::ones({2, 3}).sum().item<float>();
  std::printf("sentencepiece: %zu ids; LibTorch: sum %.1f\n", ids.size(), sum);
  std::filesystem::remove_all(dir);
  return sum == 6.0f ? 0 : 1;
}

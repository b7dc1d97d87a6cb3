#include "torch_test.h"

#include <cmath>
#include <map>
#include <random>
#include <set>

#include "rhine/core/error.h"
#include "rhine/data/loader.h"
#include "rhine/formats/token_shard.h"
#include "test_util.h"

using Catch::Matchers::Contains;
using rhine::DataLoader;
using rhine::DataLoaderOptions;
using rhine::MixtureOptions;

namespace {

constexpr std::int32_t kBos = 1, kEos = 2, kFirst = 10;

// Shards where every token id is unique within its language: ids count up from
// kFirst in file order, so a token tells its document and position.
struct Corpus {
  rhine::test::TempDir dir{"loader"};
  std::map<std::string, std::vector<std::pair<std::int32_t, std::int32_t>>> doc_ranges;  // [first id, end id)
  std::map<std::string, std::int32_t> next_id;

  Corpus() {
    std::mt19937 gen(5);
    rhine::TokenShardMeta m;
    m.vocab_size = 65536;
    m.languages = {"de", "fr", "en"};
    m.sources = {"test"};
    // Two shards; German documents in both.
    const std::vector<std::vector<std::pair<int, int>>> plan = {
        {{0, 40}, {1, 20}},  // shard 0: 40 de docs, 20 fr docs
        {{2, 80}, {0, 10}},  // shard 1: 80 en docs, 10 de docs
    };
    for (std::size_t s = 0; s < plan.size(); ++s) {
      rhine::TokenShardWriter w(dir.file("part" + std::to_string(s) + ".tokens"), m);
      for (auto [lang, n_docs] : plan[s])
        for (int d = 0; d < n_docs; ++d) {
          const auto& name = m.languages[lang];
          if (!next_id.count(name)) next_id[name] = kFirst;
          std::vector<std::int32_t> ids(gen() % 200 + (d % 7 == 0 ? 0 : 1));  // some empty docs
          for (auto& id : ids) id = next_id[name]++;
          doc_ranges[name].emplace_back(ids.empty() ? -1 : ids.front(), ids.empty() ? -1 : ids.back() + 1);
          w.add(ids, static_cast<std::uint16_t>(lang), 0);
        }
      w.finish();
    }
  }

  // Which document (index in file order) an id belongs to.
  int doc_of(const std::string& lang, std::int64_t id) const {
    const auto& r = doc_ranges.at(lang);
    for (std::size_t i = 0; i < r.size(); ++i)
      if (id >= r[i].first && id < r[i].second) return static_cast<int>(i);
    return -1;
  }

  DataLoaderOptions options() const {
    DataLoaderOptions o;
    o.shards = {dir.path.string()};
    o.batch_size = 4;
    o.seq_len = 32;
    o.seed = 1234;
    return o;
  }
};

MixtureOptions only(const std::string& lang) {
  MixtureOptions m;
  m.kind = MixtureOptions::Kind::weights;
  m.weights = {{lang, 1.0}};
  return m;
}

std::vector<std::int64_t> row(const at::Tensor& t, std::int64_t r) {
  auto c = t[r].contiguous();
  return {c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel()};
}

void check_same_batches(const rhine::Batch& a, const rhine::Batch& b) {
  CHECK(a.step == b.step);
  CHECK(a.input_ids.equal(b.input_ids));
  CHECK(a.labels.equal(b.labels));
  CHECK(a.position_ids.equal(b.position_ids));
  CHECK(a.doc_ids.equal(b.doc_ids));
  CHECK(a.row_language == b.row_language);
}

}  // namespace

TEST_CASE("packed rows cover every token of an epoch exactly once, documents whole and in order",
          "[loader]") {
  Corpus c;
  for (auto mode : {DataLoaderOptions::Mode::packed, DataLoaderOptions::Mode::windows}) {
    const bool packed = mode == DataLoaderOptions::Mode::packed;
    INFO((packed ? "packed" : "windows"));
    auto o = c.options();
    o.mode = mode;
    o.mixture = {{0, only("fr")}};
    DataLoader loader(o);
    const auto langs = loader.languages();
    REQUIRE(langs == std::vector<std::string>{"de", "en", "fr"});
    const std::int64_t N = static_cast<std::int64_t>(loader.tokens_per_language()[2]);
    CHECK(N == c.next_id["fr"] - kFirst);
    const std::int64_t T = o.seq_len;
    // Packed: ceil(N / T) rows start in epoch 0; windows: floor((N - 1) / T) windows.
    const std::int64_t rows = packed ? (N + T - 1) / T : (N - 1) / T;
    std::vector<std::int64_t> seen;
    std::vector<std::vector<std::int64_t>> all_rows, all_labels, all_docs, all_pos;
    while (static_cast<std::int64_t>(all_rows.size()) < rows) {
      auto b = loader.next();
      for (std::int64_t r = 0; r < b.input_ids.size(0); ++r) {
        all_rows.push_back(row(b.input_ids, r));
        all_labels.push_back(row(b.labels, r));
        all_docs.push_back(row(b.doc_ids, r));
        all_pos.push_back(row(b.position_ids, r));
      }
    }
    all_rows.resize(rows);
    for (const auto& r : all_rows) seen.insert(seen.end(), r.begin(), r.end());
    if (packed) seen.resize(N);  // the last row runs into the next epoch
    std::sort(seen.begin(), seen.end());
    std::vector<std::int64_t> expected;
    for (std::int64_t i = 0; i < (packed ? N : rows * T); ++i) expected.push_back(kFirst + i);
    if (!packed) {
      // Windows cover [0, rows * T) of the file-order stream, in some order.
      CHECK(seen == expected);
    } else {
      CHECK(seen == expected);
    }
    // Within each row: doc_ids change exactly where the document changes,
    // positions restart there, labels are the next token or -100 across a boundary.
    for (std::int64_t r = 0; r < rows; ++r) {
      const auto& x = all_rows[r];
      for (std::int64_t i = 0; i < T; ++i) {
        const int d = c.doc_of("fr", x[i]);
        REQUIRE(d >= 0);
        if (i > 0) {
          const bool same = c.doc_of("fr", x[i - 1]) == d;
          CHECK((all_docs[r][i] == all_docs[r][i - 1]) == same);
          CHECK(all_pos[r][i] == (same ? all_pos[r][i - 1] + 1 : 0));
          if (same) CHECK(x[i] == x[i - 1] + 1);  // documents are whole and in order
          CHECK(all_labels[r][i - 1] == (same ? x[i] : -100));
        } else {
          CHECK(all_pos[r][0] == 0);
          CHECK(all_docs[r][0] == 0);
        }
      }
    }
  }
}

TEST_CASE("bos and eos frame every document", "[loader]") {
  Corpus c;
  auto o = c.options();
  o.bos_id = kBos;
  o.eos_id = kEos;
  o.mixture = {{0, only("de")}};
  DataLoader loader(o);
  const std::uint64_t n_docs = c.doc_ranges["de"].size();
  CHECK(loader.tokens_per_language()[0] == static_cast<std::uint64_t>(c.next_id["de"] - kFirst) + 2 * n_docs);
  for (int step = 0; step < 10; ++step) {
    auto b = loader.next();
    for (std::int64_t r = 0; r < b.input_ids.size(0); ++r) {
      auto x = row(b.input_ids, r), d = row(b.doc_ids, r), lab = row(b.labels, r);
      for (std::size_t i = 1; i < x.size(); ++i) {
        if (d[i] != d[i - 1]) {
          CHECK(x[i] == kBos);
          CHECK(x[i - 1] == kEos);
          CHECK(lab[i - 1] == -100);
        }
        if (x[i] == kBos) CHECK(d[i] != d[i - 1]);
      }
    }
  }
}

TEST_CASE("realised language proportions match the mixture", "[loader]") {
  Corpus c;
  std::vector<MixtureOptions> mixes(3);
  mixes[0].kind = MixtureOptions::Kind::weights;
  mixes[0].weights = {{"de", 0.5}, {"fr", 0.2}, {"en", 0.3}};
  mixes[1].kind = MixtureOptions::Kind::temperature;
  mixes[1].temperature = 3;
  mixes[2].kind = MixtureOptions::Kind::unimax;
  mixes[2].unimax_budget_tokens = 30000;
  mixes[2].unimax_max_epochs = 2;
  for (const auto& mix : mixes) {
    INFO(rhine::describe(mix));
    auto o = c.options();
    o.batch_size = 50;
    o.seq_len = 8;
    o.mixture = {{0, mix}};
    DataLoader loader(o);
    auto p = loader.probabilities(0);
    if (mix.kind == MixtureOptions::Kind::temperature) {
      // Closed form from the loader's own token counts.
      double z = 0;
      for (auto n : loader.tokens_per_language()) z += std::pow(double(n), 1.0 / 3.0);
      for (std::size_t l = 0; l < p.size(); ++l)
        CHECK(p[l] == Approx(std::pow(double(loader.tokens_per_language()[l]), 1.0 / 3.0) / z));
    }
    std::vector<double> counts(p.size(), 0);
    const int n_rows = 50 * 80;
    for (int s = 0; s < 80; ++s)
      for (int l : loader.next().row_language) counts[l] += 1;
    for (std::size_t l = 0; l < p.size(); ++l) {
      const double sd = std::sqrt(n_rows * p[l] * (1 - p[l]));
      CHECK(std::abs(counts[l] - n_rows * p[l]) <= 5 * sd + 1e-9);  // 5 sigma
    }
  }
}

TEST_CASE("resume from a saved state continues with exactly the same batches", "[loader]") {
  Corpus c;
  for (auto mode : {DataLoaderOptions::Mode::packed, DataLoaderOptions::Mode::windows}) {
    auto o = c.options();
    o.mode = mode;
    o.bos_id = kBos;
    o.seq_len = 48;  // rows cross documents and epochs of the small languages
    MixtureOptions later = only("en");
    o.mixture = {{0, MixtureOptions{}}, {6, later}};  // curriculum switch at step 6
    o.goldfish.k = 3;
    std::vector<rhine::Batch> full;
    std::string state_at_4;
    {
      DataLoader a(o);  // prefetching
      for (int s = 0; s < 12; ++s) {
        full.push_back(a.next());
        if (s == 3) state_at_4 = a.state();
      }
    }
    auto o2 = o;
    o2.prefetch = 0;  // prefetching must not change what comes out
    DataLoader b(o2);
    (void)b.next();  // some unrelated progress first
    b.load_state(state_at_4);
    for (int s = 4; s < 12; ++s) check_same_batches(b.next(), full[s]);
    for (int l : full[8].row_language) CHECK(l == 1);  // "en" after the switch
  }
}

TEST_CASE("ranks see disjoint rows that together are the single-process stream", "[loader]") {
  Corpus c;
  auto o = c.options();
  o.batch_size = 6;
  DataLoader single(o);
  o.world_size = 2;
  o.rank = 0;
  DataLoader r0(o);
  o.rank = 1;
  DataLoader r1(o);
  for (int s = 0; s < 8; ++s) {
    auto all = single.next(), a = r0.next(), b = r1.next();
    CHECK(at::cat({a.input_ids, b.input_ids}).equal(all.input_ids));
    CHECK(at::cat({a.labels, b.labels}).equal(all.labels));
    CHECK(at::cat({a.position_ids, b.position_ids}).equal(all.position_ids));
    auto langs = a.row_language;
    langs.insert(langs.end(), b.row_language.begin(), b.row_language.end());
    CHECK(langs == all.row_language);
    for (std::size_t l = 0; l < all.tokens_per_language.size(); ++l)
      CHECK(a.tokens_per_language[l] + b.tokens_per_language[l] == all.tokens_per_language[l]);
  }
}

TEST_CASE("loader options and states are checked", "[loader]") {
  Corpus c;
  auto o = c.options();
  o.seq_len = 100000;
  CHECK_THROWS_WITH(DataLoader(o), Contains("[loader] language de has fewer tokens than one row"));
  o = c.options();
  o.world_size = 3;
  CHECK_THROWS_WITH(DataLoader(o), Contains("batch_size (global rows) must be a positive multiple of world_size"));
  o = c.options();
  o.shards = {c.dir.file("nope.tokens")};
  CHECK_THROWS_WITH(DataLoader(o), Contains("[loader] shard not found"));
  o = c.options();
  o.bos_id = 70000;
  CHECK_THROWS_WITH(DataLoader(o), Contains("bos/eos id outside the shards' vocabulary, got 70000"));
  o = c.options();
  DataLoader a(o);
  a.next();
  o.seq_len = 16;
  DataLoader b(o);
  CHECK_THROWS_WITH(b.load_state(a.state()), Contains("[loader] the state was saved with other data or options"));
  CHECK_THROWS_WITH(b.load_state("{}"), Contains("[loader] required key \"format\" is missing"));
}

TEST_CASE("document_causal_mask allows exactly same-document earlier keys", "[loader]") {
  auto doc = at::tensor({0, 0, 1, 1, 1, 2}).view({1, 6}).to(at::kLong);
  auto m = rhine::document_causal_mask(doc);
  REQUIRE(m.sizes() == at::IntArrayRef({1, 1, 6, 6}));
  for (int i = 0; i < 6; ++i)
    for (int j = 0; j < 6; ++j)
      CHECK(m[0][0][i][j].item<bool>() == (j <= i && doc[0][i].item<long>() == doc[0][j].item<long>()));
}

TEST_CASE("goldfish drops about 1 in k labels, by context only", "[loader]") {
  rhine::GoldfishOptions g;
  g.k = 4;
  g.h = 3;
  auto x = at::randint(0, 50000, {64, 128}, at::kLong);
  // Row 1 repeats row 0: the same contexts must drop the same labels.
  x[1].copy_(x[0]);
  auto labels = x.roll(-1, 1).clone();
  auto before = labels.clone();
  rhine::apply_goldfish(x, labels, g);
  auto dropped = (labels == -100);
  const double rate = dropped.to(at::kDouble).mean().item<double>();
  CHECK(rate == Approx(0.25 * 126.0 / 128.0).margin(0.02));  // the first h-1 positions never drop
  CHECK(dropped.index({at::indexing::Slice(), at::indexing::Slice(0, 2)}).sum().item<long>() == 0);
  CHECK(dropped[0].equal(dropped[1]));
  CHECK(labels.masked_select(dropped.logical_not()).equal(before.masked_select(dropped.logical_not())));
  g.k = 0;
  auto untouched = before.clone();
  rhine::apply_goldfish(x, untouched, g);
  CHECK(untouched.equal(before));
}

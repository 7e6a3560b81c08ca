// Tiny llama.cpp logits dumper used by scripts/reference/make_gguf_fixtures.sh.
//
//   llama_logits MODEL.gguf TOKENS(comma separated) N_GREEDY OUT_PREFIX
//
// Writes
//   OUT_PREFIX.logits.f32         raw little-endian f32 [T, n_vocab]: logits of every
//                                 prompt position, prompt decoded as ONE batch
//   OUT_PREFIX.greedy_logits.f32  raw f32 [N_GREEDY, n_vocab]: row i = logits from which
//                                 greedy token i was picked (row 0 = last prompt row,
//                                 then one llama_decode per generated token, KV cached)
//   OUT_PREFIX.greedy.txt         the N_GREEDY greedy token ids, comma separated
//
// Settings: CPU only, 2 threads, no mmap, flash attention off, f32 KV cache (so the
// only deviations from exact f32 math are llama.cpp's own weight/activation
// quantisation and kernel rounding, not an f16 KV cache).
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet_log(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static int argmax(const float * row, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (row[i] > row[best]) {
            best = i;
        }
    }
    return best;
}

static void write_f32(const std::string & path, const std::vector<float> & v) {
    FILE * f = fopen(path.c_str(), "wb");
    if (!f || fwrite(v.data(), sizeof(float), v.size(), f) != v.size()) {
        fprintf(stderr, "cannot write %s\n", path.c_str());
        exit(1);
    }
    fclose(f);
}

int main(int argc, char ** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKENS N_GREEDY OUT_PREFIX\n", argv[0]);
        return 2;
    }
    const char * model_path = argv[1];
    std::vector<llama_token> prompt;
    for (char * p = argv[2]; *p;) {
        prompt.push_back((llama_token) strtol(p, &p, 10));
        if (*p == ',') {
            p++;
        }
    }
    const int n_greedy = atoi(argv[3]);
    const std::string out = argv[4];
    const int T = (int) prompt.size();

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.load_mode = LLAMA_LOAD_MODE_NONE;
    mp.progress_callback = [](float, void *) { return true; };  // no progress dots
    llama_model * model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        fprintf(stderr, "failed to load %s\n", model_path);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = T + n_greedy + 8;
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_seq_max = 1;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.no_perf = true;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "failed to create context\n");
        return 1;
    }

    // Prompt: one batch, logits for every position.
    llama_batch batch = llama_batch_init(T, 0, 1);
    for (int i = 0; i < T; i++) {
        batch.token[i] = prompt[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = T;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "prompt decode failed\n");
        return 1;
    }
    std::vector<float> logits((size_t) T * n_vocab);
    for (int i = 0; i < T; i++) {
        memcpy(&logits[(size_t) i * n_vocab], llama_get_logits_ith(ctx, i), n_vocab * sizeof(float));
    }
    write_f32(out + ".logits.f32", logits);
    llama_batch_free(batch);

    // Greedy: one token per llama_decode, KV cache reused.
    std::vector<float> glogits;
    std::vector<int> greedy;
    std::vector<float> row(logits.end() - n_vocab, logits.end());
    for (int g = 0; g < n_greedy; g++) {
        glogits.insert(glogits.end(), row.begin(), row.end());
        llama_token tok = argmax(row.data(), n_vocab);
        greedy.push_back(tok);
        if (g + 1 == n_greedy) {
            break;
        }
        llama_batch one = llama_batch_init(1, 0, 1);
        one.token[0] = tok;
        one.pos[0] = T + g;
        one.n_seq_id[0] = 1;
        one.seq_id[0][0] = 0;
        one.logits[0] = 1;
        one.n_tokens = 1;
        if (llama_decode(ctx, one) != 0) {
            fprintf(stderr, "greedy decode failed\n");
            return 1;
        }
        const float * l = llama_get_logits_ith(ctx, 0);
        row.assign(l, l + n_vocab);
        llama_batch_free(one);
    }
    write_f32(out + ".greedy_logits.f32", glogits);
    FILE * f = fopen((out + ".greedy.txt").c_str(), "w");
    for (size_t i = 0; i < greedy.size(); i++) {
        fprintf(f, "%s%d", i ? "," : "", greedy[i]);
    }
    fprintf(f, "\n");
    fclose(f);

    printf("n_vocab=%d T=%d greedy=", n_vocab, T);
    for (size_t i = 0; i < greedy.size(); i++) {
        printf("%s%d", i ? "," : "", greedy[i]);
    }
    printf("\n");

    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}

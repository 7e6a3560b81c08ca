//! GGUF v3: bounds-checked reader and streaming writer. (being written)

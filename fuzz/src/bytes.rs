//! A tiny decoder that turns fuzz bytes into choices. Kept dependency-free (no `arbitrary`) so
//! `tests/fuzz_regressions.rs` can replay the same inputs without extra dev-dependencies. Running
//! out of bytes yields zeros, so every byte string is a valid input.

pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    /// One of `options` (never empty).
    pub fn pick<T: Clone>(&mut self, options: &[T]) -> T {
        options[usize::from(self.byte()) % options.len()].clone()
    }

    /// A string from `pool`, or (for the byte 255) up to 63 raw bytes, lossily decoded.
    pub fn string(&mut self, pool: &[&str]) -> String {
        let b = self.byte();
        if b == u8::MAX {
            let len = usize::from(self.byte() % 64).min(self.data.len());
            let (raw, rest) = self.data.split_at(len);
            self.data = rest;
            return String::from_utf8_lossy(raw).into_owned();
        }
        pool[usize::from(b) % pool.len()].to_owned()
    }

    /// What is left, consumed.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

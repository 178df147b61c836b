//! PersonaPlex's text tokenizer: a SentencePiece unigram model (`tokenizer_spm_32k_3.model`,
//! ARCHITECTURE §6) read from its protobuf file and run by the `tokenizers` crate's `Unigram`.

use std::path::Path;

use tokenizers::models::unigram::Unigram;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};

use super::DuplexError;

/// One piece of a SentencePiece model: its text and log-probability score.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece; `▁` (U+2581) stands for a space.
    pub text: String,
    /// Unigram log-probability.
    pub score: f32,
    /// SentencePiece type: 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte.
    pub kind: u32,
}

impl Piece {
    /// A piece of `kind` (1 normal, 2 unknown, 3 control, 4 user defined, 6 byte).
    pub fn new(text: impl Into<String>, score: f32, kind: u32) -> Self {
        Self {
            text: text.into(),
            score,
            kind,
        }
    }
}

/// Text to token ids and back, for the `<system>`-wrapped text prompt and the model's inner
/// monologue.
pub struct TextTokenizer {
    pieces: Vec<Piece>,
    tokenizer: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Reads a SentencePiece `.model` file.
    ///
    /// # Errors
    /// [`DuplexError::MissingFile`] when it is absent, [`DuplexError::Load`] when it is not a
    /// SentencePiece model.
    pub fn load(path: &Path) -> Result<Self, DuplexError> {
        let bytes =
            std::fs::read(path).map_err(|_| DuplexError::MissingFile(path.to_path_buf()))?;
        let pieces = parse_model(&bytes).map_err(|reason| DuplexError::Load {
            file: path.to_path_buf(),
            reason,
        })?;
        Self::from_pieces(pieces).map_err(|e| DuplexError::Load {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// A tokenizer over `pieces` (id = index).
    ///
    /// # Errors
    /// The `tokenizers` crate's error when the vocabulary is empty or has no unknown piece.
    pub fn from_pieces(pieces: Vec<Piece>) -> tokenizers::Result<Self> {
        let unk = pieces.iter().position(|p| p.kind == 2);
        let vocab = pieces
            .iter()
            .map(|p| (p.text.clone(), f64::from(p.score)))
            .collect();
        let byte_fallback = pieces.iter().any(|p| p.kind == 6);
        let model = Unigram::from(vocab, unk, byte_fallback)?;
        let mut tokenizer = tokenizers::Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
        Ok(Self { pieces, tokenizer })
    }

    /// Token ids of `text`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default()
    }

    /// The text of token `id` with `▁` as a space; empty for control, unknown and out-of-range
    /// ids.
    pub fn piece_text(&self, id: u32) -> String {
        match self.pieces.get(id as usize) {
            Some(p) if p.kind == 1 || p.kind == 4 => p.text.replace('▁', " "),
            _ => String::new(),
        }
    }
}

/// The pieces of a SentencePiece `ModelProto` (field 1, repeated `SentencePiece {1: piece,
/// 2: score, 3: type}`; sentencepiece_model.proto). Other fields are skipped.
///
/// # Errors
/// A message when the bytes are not such a protobuf or hold no pieces.
pub fn parse_model(bytes: &[u8]) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut reader = Proto(bytes);
    while let Some((field, value)) = reader.next_field()? {
        if let (1, Value::Bytes(message)) = (field, value) {
            let mut piece = Piece::new("", 0.0, 1);
            let mut inner = Proto(message);
            while let Some((field, value)) = inner.next_field()? {
                match (field, value) {
                    (1, Value::Bytes(text)) => {
                        piece.text = String::from_utf8(text.to_vec())
                            .map_err(|_| "a piece is not UTF-8".to_string())?;
                    }
                    (2, Value::Fixed32(bits)) => piece.score = f32::from_bits(bits),
                    (3, Value::Varint(kind)) => piece.kind = kind as u32,
                    _ => {}
                }
            }
            pieces.push(piece);
        }
    }
    if pieces.is_empty() {
        return Err("no SentencePiece pieces (not a SentencePiece model)".into());
    }
    Ok(pieces)
}

/// Writes `pieces` as a SentencePiece `ModelProto` (field 1 only): the inverse of
/// [`parse_model`], for test models.
pub fn write_model(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in pieces {
        let mut message = Vec::new();
        message.push(0x0a);
        varint(&mut message, piece.text.len() as u64);
        message.extend_from_slice(piece.text.as_bytes());
        message.push(0x15);
        message.extend_from_slice(&piece.score.to_bits().to_le_bytes());
        message.push(0x18);
        varint(&mut message, u64::from(piece.kind));
        out.push(0x0a);
        varint(&mut out, message.len() as u64);
        out.extend_from_slice(&message);
    }
    out
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// A protobuf wire-format reader (varint, 64-bit, length-delimited, 32-bit).
struct Proto<'a>(&'a [u8]);

impl<'a> Proto<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated field".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().expect("4 bytes"),
            )),
            other => return Err(format!("unsupported protobuf wire type {other}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_model_reads_back_and_encodes_by_score() {
        let pieces = vec![
            Piece::new("<unk>", 0.0, 2),
            Piece::new("<s>", 0.0, 3),
            Piece::new("▁hello", -1.0, 1),
            Piece::new("▁", -2.0, 1),
            Piece::new("h", -5.0, 1),
            Piece::new("e", -5.0, 1),
            Piece::new("l", -5.0, 1),
            Piece::new("o", -5.0, 1),
            Piece::new("▁world", -1.5, 1),
        ];
        let bytes = write_model(&pieces);
        assert_eq!(parse_model(&bytes).unwrap(), pieces);
        let tokenizer = TextTokenizer::from_pieces(pieces).unwrap();
        assert_eq!(tokenizer.encode("hello world"), [2, 8]);
        assert_eq!(tokenizer.piece_text(8), " world");
        assert_eq!(tokenizer.piece_text(1), "", "control pieces are not text");
        assert!(parse_model(b"\x0a\x05ab").is_err(), "truncated");
        assert!(parse_model(b"").is_err(), "empty");
    }
}

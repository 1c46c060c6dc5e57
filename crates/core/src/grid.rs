//! Token grids in raster order.

use serde::{Deserialize, Serialize};

use crate::params::ParamError;

/// The shape of a token grid: `rows × cols` tokens, read in raster (row-major) order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridSize {
    /// Number of token rows.
    pub rows: usize,
    /// Number of token columns.
    pub cols: usize,
}

impl GridSize {
    /// A square grid of `n × n` tokens.
    pub fn square(n: usize) -> Self {
        Self { rows: n, cols: n }
    }

    /// Number of tokens in the grid.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// True when the grid holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(row, col)` of raster index `i`.
    pub fn coords(&self, i: usize) -> (usize, usize) {
        (i / self.cols, i % self.cols)
    }

    /// Raster index of `(row, col)`.
    pub fn index(&self, row: usize, col: usize) -> usize {
        row * self.cols + col
    }
}

impl std::fmt::Display for GridSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.rows, self.cols)
    }
}

/// A complete grid of token ids in raster order, checked against a grid size and vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrid {
    size: GridSize,
    tokens: Vec<u32>,
}

impl TokenGrid {
    /// Checks that `tokens` fills `size` exactly and that every id is below `vocab`.
    pub fn new(size: GridSize, tokens: Vec<i64>, vocab: usize) -> Result<Self, ParamError> {
        if tokens.len() != size.len() {
            return Err(ParamError::new(
                "tokens",
                format!(
                    "expected {} tokens for a {} grid, got {}",
                    size.len(),
                    size,
                    tokens.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(tokens.len());
        for (i, &t) in tokens.iter().enumerate() {
            if t < 0 || t as u64 >= vocab as u64 {
                return Err(ParamError::new(
                    "tokens",
                    format!("token {i} is {t}, outside the vocabulary [0, {vocab})"),
                ));
            }
            out.push(t as u32);
        }
        Ok(Self { size, tokens: out })
    }

    /// The grid size.
    pub fn size(&self) -> GridSize {
        self.size
    }

    /// Token ids in raster order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Token ids in raster order as `i64` (the index type of tensors).
    pub fn to_i64(&self) -> Vec<i64> {
        self.tokens.iter().map(|&t| i64::from(t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_wrong_length_and_out_of_vocab() {
        let g = GridSize { rows: 2, cols: 3 };
        assert!(TokenGrid::new(g, vec![0; 5], 10).is_err());
        let e = TokenGrid::new(g, vec![0, 1, 2, 3, 4, 10], 10).unwrap_err();
        assert!(e.to_string().contains("token 5 is 10"), "{e}");
        assert!(TokenGrid::new(g, vec![0, 1, 2, 3, 4, -1], 10).is_err());
        assert_eq!(TokenGrid::new(g, vec![9; 6], 10).unwrap().tokens(), &[9; 6]);
    }

    proptest! {
        #[test]
        fn coords_roundtrip(rows in 1usize..40, cols in 1usize..40, i in 0usize..1600) {
            let g = GridSize { rows, cols };
            let i = i % g.len();
            let (r, c) = g.coords(i);
            prop_assert!(r < rows && c < cols);
            prop_assert_eq!(g.index(r, c), i);
        }
    }
}

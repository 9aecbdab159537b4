//! CPU reference implementations. They are the definition of correct: a faster back end must match
//! them, so they favour clarity and exactness over tricks, and use rayon only where rows or columns
//! are independent (the result never depends on the thread count).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;

use crate::{check_len, KernelError};

mod crop;
mod distance;
mod flood;
mod image;
mod label;
#[cfg(test)]
mod tests;

pub use crop::*;
pub use distance::*;
pub use flood::*;
pub use image::*;
pub use label::*;

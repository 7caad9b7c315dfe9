//! How model code gets its weights, independent of the backend: a [`WeightSource`] hands out one
//! weight group at a time (acquired just before the layer runs, released when the group is
//! dropped), and a [`WeightGroup`] gives the group's tensors as the backend's tensor type.
//!
//! On the CPU the source is the [`Executor`](crate::exec::Executor) (weights read back from the
//! simulated device); on CUDA it will hand out views into the scheduler's arena.

use crate::backend::Backend;
use crate::error::Result;

/// One acquired weight group; released when dropped.
pub trait WeightGroup<B: Backend> {
    /// The weight `key` (relative to the group prefix, e.g. `"conv1.weight"`).
    fn get(&self, key: &str) -> Result<&B::Tensor>;
    /// The weight `key`, checked against the shape the config implies.
    fn get_shaped(&self, key: &str, shape: &[usize]) -> Result<&B::Tensor>;
    /// The weight `key` if present (optional biases).
    fn opt(&self, key: &str) -> Option<&B::Tensor>;
    /// Whether the group has `key`.
    fn has(&self, key: &str) -> bool {
        self.opt(key).is_some()
    }
    /// The group's full name (`component.prefix`).
    fn name(&self) -> &str;
}

/// Hands out weight groups by component and module prefix.
pub trait WeightSource<B: Backend> {
    /// The acquired group type.
    type Group<'a>: WeightGroup<B>
    where
        Self: 'a;
    /// Acquires group `component.prefix` for the work issued next.
    fn group<'a>(&'a self, component: &str, prefix: &str) -> Result<Self::Group<'a>>;
}

/// Weight views on the GPU that are resident for the whole run (everything-resident placement,
/// or a test harness): each group's tensors are fixed [`CudaTensor`] views into device memory.
/// Acquiring and releasing cost nothing.
#[derive(Debug, Default)]
pub struct ResidentViews {
    groups: std::collections::HashMap<String, Vec<(String, crate::backend::CudaTensor)>>,
}

impl ResidentViews {
    /// No groups yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds group `component.prefix` with its `(key, view)` tensors.
    pub fn insert(
        &mut self,
        component: &str,
        prefix: &str,
        tensors: Vec<(String, crate::backend::CudaTensor)>,
    ) {
        self.groups.insert(format!("{component}.{prefix}"), tensors);
    }
}

/// A group of [`ResidentViews`].
#[derive(Debug)]
pub struct ViewGroup<'a> {
    name: &'a str,
    tensors: &'a [(String, crate::backend::CudaTensor)],
}

impl<'b> WeightGroup<crate::backend::CudaBackend<'b>> for ViewGroup<'_> {
    fn get(&self, key: &str) -> Result<&crate::backend::CudaTensor> {
        self.opt_tensor(key)
            .ok_or_else(|| crate::error::Error::MissingWeight(format!("{}.{key}", self.name)))
    }

    fn get_shaped(&self, key: &str, shape: &[usize]) -> Result<&crate::backend::CudaTensor> {
        let t = WeightGroup::<crate::backend::CudaBackend<'b>>::get(self, key)?;
        if t.shape() != shape {
            return Err(crate::error::Error::WeightShape {
                name: format!("{}.{key}", self.name),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        Ok(t)
    }

    fn opt(&self, key: &str) -> Option<&crate::backend::CudaTensor> {
        self.opt_tensor(key)
    }

    fn name(&self) -> &str {
        self.name
    }
}

impl ViewGroup<'_> {
    fn opt_tensor(&self, key: &str) -> Option<&crate::backend::CudaTensor> {
        self.tensors.iter().find(|(k, _)| k == key).map(|(_, t)| t)
    }
}

impl<'b> WeightSource<crate::backend::CudaBackend<'b>> for ResidentViews {
    type Group<'a>
        = ViewGroup<'a>
    where
        Self: 'a;

    fn group<'a>(&'a self, component: &str, prefix: &str) -> Result<ViewGroup<'a>> {
        let name = format!("{component}.{prefix}");
        match self.groups.get_key_value(&name) {
            Some((k, v)) => Ok(ViewGroup {
                name: k.as_str(),
                tensors: v.as_slice(),
            }),
            None => Err(crate::error::Error::InvalidArgument(format!(
                "no weight group '{name}' was declared"
            ))),
        }
    }
}

//! The golden-comparison helpers every parity test relies on reject a NaN or an infinity in the
//! output (or the reference) instead of letting it through, as `f32::max` folds once did.

// `!(e <= tol)` is the point here: what a tolerance check does with a NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

mod common;

use common::{assert_finite, check, golden, rel_err, to_np, TOL};
use ferry_sd::tensor::Tensor;
use std::panic::{catch_unwind, AssertUnwindSafe};

const BAD: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];

/// `t` with `value` at flat index `at`.
fn with(t: &Tensor, at: usize, value: f32) -> Tensor {
    let mut d = t.data().to_vec();
    d[at] = value;
    Tensor::new(t.shape().to_vec(), d).unwrap()
}

/// `t` with every element `value`.
fn all(t: &Tensor, value: f32) -> Tensor {
    Tensor::full(t.shape().to_vec(), value).unwrap()
}

/// The panic message of `f`, or `None` when it returned.
fn panics(f: impl FnOnce()) -> Option<String> {
    catch_unwind(AssertUnwindSafe(f)).err().map(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// Positions to plant a bad value at: first, middle, last (a fold must not skip any).
fn positions(t: &Tensor) -> [usize; 3] {
    [0, t.numel() / 2, t.numel() - 1]
}

#[test]
fn check_accepts_the_golden_and_rejects_nan_or_inf_anywhere() {
    let want = golden("sd15", "pipe.ddim.latents");
    assert_eq!(check("golden itself", &want, &want), 0.0);
    for bad in BAD {
        for at in positions(&want) {
            let ours = with(&want, at, bad);
            let msg = panics(|| {
                check("planted", &ours, &want);
            })
            .unwrap_or_else(|| panic!("check accepted {bad} at {at}"));
            assert!(
                msg.contains("not finite") && msg.contains("planted"),
                "{msg}"
            );
            // The same value in the reference is rejected too.
            assert!(
                panics(|| {
                    check("planted ref", &want, &ours);
                })
                .is_some(),
                "check accepted a reference with {bad} at {at}"
            );
        }
        assert!(panics(|| {
            check("all bad", &all(&want, bad), &want);
        })
        .is_some());
    }
    // An honest miss still fails.
    let off = with(&want, 3, want.data()[3] + 10.0 * TOL * want.max_abs());
    assert!(panics(|| {
        check("off", &off, &want);
    })
    .is_some());
}

#[test]
fn rel_err_of_nan_or_inf_passes_no_tolerance_either_way() {
    let want = golden("sd15", "pipe.euler.latents");
    assert_eq!(rel_err(&want, &want), 0.0);
    for bad in BAD {
        for at in positions(&want) {
            for (a, b) in [
                (with(&want, at, bad), want.clone()),
                (want.clone(), with(&want, at, bad)),
            ] {
                let e = rel_err(&a, &b);
                // Neither "close" (`e <= tol`) nor "different" (`e > tol`) may hold.
                assert!(!(e <= 1e-3) && !(e > 0.1), "{bad} at {at}: {e}");
            }
        }
        let e = rel_err(&all(&want, bad), &want);
        assert!(!(e <= 1e-3) && !(e > 0.1), "all {bad}: {e}");
    }
}

#[test]
fn image_comparison_rejects_nan_or_inf_before_the_clamp_hides_it() {
    // The pipeline tests compare `to_np(images)` with the image golden by max |diff|.
    let sample = golden("sd15", "vae.decode.sample");
    let np = to_np(&sample);
    assert_eq!(np.shape(), &[1, 32, 64, 3]);
    assert_eq!(np.max_abs_diff(&np).unwrap(), 0.0);
    for bad in BAD {
        for at in positions(&sample) {
            let msg = panics(|| {
                to_np(&with(&sample, at, bad));
            })
            .unwrap_or_else(|| panic!("to_np accepted {bad} at {at}"));
            assert!(msg.contains("not finite"), "{msg}");
        }
        // The image golden with a bad pixel never compares within a tolerance.
        for at in positions(&np) {
            let d = np.max_abs_diff(&with(&np, at, bad)).unwrap();
            assert!(!(d <= 2.0 / 255.0), "{bad} at {at}: {d}");
        }
    }
}

#[test]
fn assert_finite_names_the_first_bad_element() {
    let t = golden("sd15", "pipe.latents_init");
    assert_finite("init", &t);
    let msg = panics(|| assert_finite("init", &with(&with(&t, 7, f32::NAN), 9, f32::INFINITY)))
        .expect("NaN accepted");
    assert!(
        msg.contains("init") && msg.contains("2 of 128") && msg.contains("element 7"),
        "{msg}"
    );
}

//! Finite-difference checks of every gradient the trainer relies on, in f64 on tiny shapes.
//!
//! BitLinear's straight-through estimator is checked for what it is: the gradient with respect to the latent
//! weights and activations equals the true gradient of the plain linear map evaluated at the *quantized* weights
//! and activations (finite differences of `L(Xq·Wqᵀ)` in Xq and Wq).

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use ternlm_train::loss::{attention_relation, cross_entropy, logits_kl};
use ternlm_train::quant::{int8_values, linear, ternary_values};

fn rand_tensor(rng: &mut rand::rngs::StdRng, shape: &[usize], scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Central finite differences of the scalar `f` at `x`, compared with `grad` (relative to the gradient's scale).
fn fd_check(name: &str, x: &Tensor, grad: &Tensor, f: &dyn Fn(&Tensor) -> f64) {
    let (xs, g) = (to_vec(x), to_vec(grad));
    let h = 1e-6;
    let scale = g.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    let mut worst = 0f64;
    for i in 0..xs.len() {
        let mut p = xs.clone();
        p[i] += h;
        let fp = f(&Tensor::from_vec(p.clone(), x.shape(), &Device::Cpu).unwrap());
        p[i] -= 2.0 * h;
        let fm = f(&Tensor::from_vec(p, x.shape(), &Device::Cpu).unwrap());
        let fd = (fp - fm) / (2.0 * h);
        worst = worst.max((fd - g[i]).abs() / scale);
    }
    eprintln!("{name}: max relative gradient error {worst:.2e} over {} entries", xs.len());
    assert!(worst < 1e-5, "{name}: finite differences disagree with autograd ({worst})");
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn bitlinear_straight_through() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (x0, w0, b0) =
        (rand_tensor(&mut rng, &[3, 16], 2.0), rand_tensor(&mut rng, &[5, 16], 0.1), rand_tensor(&mut rng, &[5], 0.1));
    let r = rand_tensor(&mut rng, &[3, 5], 1.0);
    let (x, w, b) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap(), Var::from_tensor(&b0).unwrap());
    let y = linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor()), true).unwrap();
    let loss = (y * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    // The forward is the plain linear map of the quantized operands.
    let (xq, wq) = (int8_values(&x0).unwrap(), ternary_values(&w0).unwrap());
    let wq_v = to_vec(&wq);
    let delta = wq_v.iter().map(|v| v.abs()).fold(0f64, f64::max);
    assert!(wq_v.iter().all(|v| *v == 0.0 || (v.abs() - delta).abs() < 1e-12), "weights are ternary × one scale");
    let plain = |x: &Tensor, w: &Tensor, b: &Tensor| {
        scalar(&(x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap() * &r).unwrap().sum_all().unwrap())
    };
    assert!((plain(&xq, &wq, &b0) - scalar(&loss)).abs() < 1e-9);
    fd_check("BitLinear dL/dW (STE)", &wq, grads.get(w.as_tensor()).unwrap(), &|t| plain(&xq, t, &b0));
    fd_check("BitLinear dL/dx (STE)", &xq, grads.get(x.as_tensor()).unwrap(), &|t| plain(t, &wq, &b0));
    fd_check("BitLinear dL/db", &b0, grads.get(b.as_tensor()).unwrap(), &|t| plain(&xq, &wq, t));
}

#[test]
fn cross_entropy_and_logits_kl() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let s0 = rand_tensor(&mut rng, &[4, 7], 3.0);
    let t0 = rand_tensor(&mut rng, &[4, 7], 3.0);
    let targets = Tensor::new(&[1u32, 6, 0, 3], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[1f64, 1.0, 0.0, 1.0], &Device::Cpu).unwrap();
    let s = Var::from_tensor(&s0).unwrap();

    let ce = |x: &Tensor| scalar(&cross_entropy(x, &targets, &mask).unwrap());
    let g = cross_entropy(s.as_tensor(), &targets, &mask).unwrap().backward().unwrap();
    fd_check("cross-entropy", &s0, g.get(s.as_tensor()).unwrap(), &ce);
    // Masked row 2 gets no gradient; the value is the mean NLL of the three others.
    assert!(to_vec(&g.get(s.as_tensor()).unwrap().get(2).unwrap()).iter().all(|v| *v == 0.0));

    let kl = |x: &Tensor| scalar(&logits_kl(&t0, x, 5.0, &mask).unwrap());
    let g = logits_kl(&t0, s.as_tensor(), 5.0, &mask).unwrap().backward().unwrap();
    fd_check("logits KL (τ = 5)", &s0, g.get(s.as_tensor()).unwrap(), &kl);
    assert!(kl(&t0).abs() < 1e-12, "KL of identical logits is 0");
    assert!(kl(&s0) > 0.0);
}

#[test]
fn attention_relation_loss() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (b, t, d, heads) = (2, 5, 12, 3);
    let s0 = rand_tensor(&mut rng, &[b, t, d], 1.0);
    let t0 = rand_tensor(&mut rng, &[b, t, d], 1.0);
    // The second sequence is padded after 3 tokens.
    let mask = Tensor::new(&[[1f64, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]], &Device::Cpu).unwrap();
    let s = Var::from_tensor(&s0).unwrap();
    let f = |x: &Tensor| scalar(&attention_relation(&t0, x, heads, &mask).unwrap());
    let g = attention_relation(&t0, s.as_tensor(), heads, &mask).unwrap().backward().unwrap();
    fd_check("attention relation", &s0, g.get(s.as_tensor()).unwrap(), &f);
    assert!(f(&t0).abs() < 1e-12 && f(&s0) > 0.0);
    // Padded positions neither count as queries nor as keys: changing them changes nothing.
    let mut v = to_vec(&s0);
    for i in 0..d {
        v[(t + 3) * d + i] += 5.0;
        v[(t + 4) * d + i] -= 3.0;
    }
    let moved = Tensor::from_vec(v, (b, t, d), &Device::Cpu).unwrap();
    assert!((f(&moved) - f(&s0)).abs() < 1e-12);
    // Relations are scale-free (cosines): scaling the student changes nothing either.
    assert!((f(&(&s0 * 3.0).unwrap()) - f(&s0)).abs() < 1e-9);
}

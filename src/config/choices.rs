//! The named choices of the config, as enums: serde reads the name once (an unknown one is an
//! error naming the key, file and line, with the names it accepts) and nothing downstream
//! parses a string again. The transforms and stencils are `crate::transforms`' own enums.

use serde::{Deserialize, Serialize};

/// An enum whose variants are config names, with `name()` and `Display` giving the name back.
macro_rules! choice {
    ($(#[$m:meta])* $ty:ident { $($(#[$vm:meta])* $var:ident = $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub enum $ty {
            $($(#[$vm])* #[serde(rename = $s)] $var,)+
        }

        impl $ty {
            /// The name the config uses.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$var => $s,)+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

choice! {
    /// `data.source`: where the images come from (MNIST's digits, or a folder of photos).
    DataSource {
        /// `.amat` files when `data.amat_dir` is set, else IDX under the data root when one is
        /// set, else the Hub.
        Auto = "auto",
        Idx = "idx",
        Hub = "hub",
        Amat = "amat",
        /// Photos in an image folder (`data.folder`: `train/`, `test/`, optional `val/`, one
        /// subfolder per class, as torchvision's `ImageFolder`).
        Folder = "folder",
        /// Any Hub image-classification set in the `datasets` Parquet layout (`[data.parquet]`).
        Parquet = "parquet",
    }
}

choice! {
    /// `pretrain.images`: which digits MAE pretraining sees (never labels, never a test digit).
    PretrainImages {
        /// The fine-tuning set: train, plus val when `data.train_on_val`.
        FineTune = "fine_tune",
        /// The train split only, whatever fine-tuning uses: the pretraining a validation sweep
        /// (`data.train_on_val = false`) ran, so a final run can reuse it.
        Train = "train",
        /// Train and val.
        TrainVal = "train_val",
    }
}

choice! {
    /// `model.kind`: which network.
    ModelKind {
        Vit = "vit",
        Cnn = "cnn",
        Gcnn = "gcnn",
        /// timm's ResNet (`[model.resnet]`).
        Resnet = "resnet",
        /// timm's ConvNeXt (`[model.convnext]`).
        Convnext = "convnext",
    }
}

choice! {
    /// `model.resnet.block`: timm's ResNet block.
    ResnetBlock {
        /// Two 3×3 convs (ResNet-18 / 34).
        Basic = "basic",
        /// 1×1 → 3×3 → 1×1 with 4× expansion (ResNet-50 / 101 / 152).
        Bottleneck = "bottleneck",
    }
}

choice! {
    /// `model.vit.pool`: what the head reads.
    Pool {
        /// The cls token after the final norm.
        Cls = "cls",
        /// The mean of the patch tokens, then fc_norm (MAE fine-tuning's global pool).
        Mean = "mean",
    }
}

choice! {
    /// `model.vit.pos_embed`.
    PosEmbed {
        Learned = "learned",
        /// Fixed 2-D sin-cos (MAE's).
        Sincos = "sincos",
    }
}

choice! {
    /// `init.weights`: where the starting weights come from.
    InitWeights {
        /// Seeded by `seed`.
        Random = "random",
        /// A Hugging Face model repo (`init.hub_repo`).
        Hub = "hub",
        /// A local checkpoint (`init.file`).
        File = "file",
        /// The encoder of this config's own `[pretrain]` MAE stage.
        Pretrain = "pretrain",
    }
}

choice! {
    /// `init.format`: the key layout of a pretrained checkpoint.
    WeightFormat {
        /// Hugging Face `ViTModel` / `ViTMAEModel`.
        Hf = "hf",
        Timm = "timm",
        /// Our own checkpoints (they load through the checkpoint module, not as pretrained weights).
        Liederiv = "liederiv",
    }
}

choice! {
    /// `train.objective`.
    Objective {
        Classify = "classify",
        /// MAE reconstruction.
        Mae = "mae",
    }
}

choice! {
    /// `lee.statistic`: how the per-class Lie derivatives of one image are reduced to a number.
    Statistic {
        /// (1/K)·Σ_k (L_X p_k)²: the paper's Eq. 4.
        Sq = "sq",
        /// (1/K)·Σ_k |L_X p_k|: the reference code's CSV number.
        Abs = "abs",
    }
}

choice! {
    /// `lee.output`: which output of the model the Lie derivative is taken of.
    LeeOutput {
        /// The class probabilities softmax(logits): the paper's LEE.
        Probs = "probs",
        Logits = "logits",
        /// The pooled representation the head reads (the ViT's pooled and normalised token, the
        /// CNNs' globally pooled features): "how equivariant is the representation?".
        Features = "features",
        /// The ViT's patch tokens after the last block (before the final norm), `(N, D)` per image.
        Tokens = "tokens",
    }
}

impl LeeOutput {
    /// A representation rather than a prediction: its LEE depends on the feature scale, so a
    /// scale-free form is reported beside it.
    pub fn is_representation(self) -> bool {
        matches!(self, LeeOutput::Features | LeeOutput::Tokens)
    }
}

choice! {
    /// `runtime.kernels`: which form of LayerNorm, softmax, GELU, attention, the linear layers
    /// and convolutions runs on the CPU.
    Kernels {
        /// The fused CPU kernels (f32 / f64); other devices and dtypes run the portable forms.
        Fused = "fused",
        /// The composed candle ops that CUDA and f16 / bf16 run, on the CPU too: to measure the
        /// GPU path's graph (its memory) on a machine without a GPU.
        Portable = "portable",
    }
}

choice! {
    /// `train.precision`: the dtype the training step computes in.
    Precision {
        /// Everything in f32.
        F32 = "f32",
        /// Mixed precision: bf16 activations and matmuls on bf16 casts of the f32 weights (the
        /// gradients flow back through the casts to the f32 master weights and AdamW state); the
        /// loss, LayerNorm statistics and the LEE penalty in f32.
        Bf16 = "bf16",
    }
}

choice! {
    /// `data.interpolation`: the resampling filter of image resizes (Pillow's, as timm uses them).
    Interpolation {
        Bilinear = "bilinear",
        /// Keys' cubic with a = −0.5 (Pillow's bicubic).
        Bicubic = "bicubic",
    }
}

"""Every config field with its default. Experiment configs call get_config() and override.

The returned ConfigDict is locked: an unknown `--config.x` fails at parse time.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = 'train'  # train | train_autoencoder | train_diffusion | sample | eval_autoencoder | eval_conditional | eval_diffusion | convert | summary
  config.seed = 0                   # all randomness: init, data order, per-step keys
  config.dtype = 'float32'          # activation dtype: float32 | bfloat16 (parameters stay float32)
  config.log_every_steps = 50       # progress lines and TensorBoard scalars
  config.xla_cpu_fast_conv = True   # on CPU, route 3x3 convs away from YNNPACK's slow weight gradient
  config.remat = 'none'             # rematerialise U-Net / autoencoder blocks: none | full | dots
  config.max_nonfinite_steps = 10   # stop after this many consecutive steps with a NaN/Inf loss or gradient

  # Multi-process runs: jax.distributed.initialize. With no coordinator here, a cluster environment
  # (SLURM, TPU, MPI, JAX_COORDINATOR_ADDRESS) is detected, else a single local process is started
  # (its coordination service delivers SIGTERM preemption notices).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ''  # host:port of process 0 ('' = from the environment)
  config.distributed.num_processes = 0         # 0 = from the environment
  config.distributed.process_id = -1           # -1 = from the environment

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1             # data-parallel axis size; -1 = all remaining devices
  config.mesh.fsdp = 1              # parameter-sharding axis size
  config.mesh.fsdp_min_size = 2**16  # arrays with fewer elements stay replicated over fsdp

  config.data = ml_collections.ConfigDict()
  config.data.source = 'synthetic'  # synthetic | folder | tfds
  config.data.path = ''             # folder source: a directory of images, searched recursively
  config.data.eval_path = ''        # folder source: the validation images ('' = no validation split)
  config.data.label_column = 'label'  # folder source: labels.csv column for the class ('' = none)
  config.data.tfds_name = 'lsun/church_outdoor'  # tfds source: dataset name
  config.data.tfds_split = 'train'  # tfds source: split
  config.data.tfds_eval_split = ''  # tfds source: validation split, e.g. 'validation' ('' = none)
  config.data.tfds_data_dir = ''    # tfds source: data_dir ('' = TFDS default); nothing is downloaded
  config.data.image_size = 64       # square side length fed to the autoencoder
  config.data.crop = 'center'       # center | random: crop to a square before resizing
  config.data.flip = True           # random horizontal flips
  config.data.synthetic_size = 10000  # synthetic source: number of examples
  config.data.synthetic_seed = 0    # synthetic source: which examples
  config.data.num_classes = 0       # number of class labels (0 = unlabelled)
  config.data.worker_count = 0      # grain worker processes (0 = in the main process)
  config.data.shuffle_buffer = 0    # unused with random-access sources; kept for streaming sources
  config.data.max_bad_fraction = 0.01  # undecodable images are skipped; above this fraction: error
  config.data.low_res_size = 0      # super-resolution: side of the degraded input made on the fly (0 = none)
  config.data.degradation = 'bicubic'  # super-resolution: bicubic (antialiased) | bsrgan_light (blur, resize, noise, JPEG)
  config.data.inpainting_masks = False  # inpainting: a random mask per example (thick strokes and boxes)

  # Stage 1: AutoencoderKL or VQModel (the paper's ddconfig + embed_dim [+ n_embed]);
  # configs/autoencoder/ holds every first-stage model the paper released.
  config.autoencoder = ml_collections.ConfigDict()
  config.autoencoder.kind = 'kl'            # kl (AutoencoderKL) | vq (VQModel)
  config.autoencoder.ch = 128               # base width
  config.autoencoder.ch_mult = (1, 2, 4, 4)  # width multiplier per resolution; f = 2**(len-1)
  config.autoencoder.num_res_blocks = 2     # ResnetBlocks per resolution (decoder: +1)
  config.autoencoder.attn_resolutions = ()  # pixel resolutions with self-attention (mid always has it)
  config.autoencoder.z_channels = 4         # encoder output channels (x2 with double_z)
  config.autoencoder.double_z = True        # encoder predicts mean and log-variance
  config.autoencoder.embed_dim = 4          # latent channels after quant_conv
  config.autoencoder.norm_num_groups = 32   # GroupNorm groups (the paper: 32)
  config.autoencoder.dropout = 0.0
  config.autoencoder.in_channels = 3
  config.autoencoder.out_ch = 3
  config.autoencoder.attn_type = 'vanilla'  # vanilla | none (no attention at all, the paper's vq-f4-noattn)
  config.autoencoder.n_embed = 8192         # vq: codebook size
  config.autoencoder.beta = 0.25            # vq: commitment weight
  config.autoencoder.legacy = True          # vq: beta on the paper's (legacy) term of the codebook loss
  config.autoencoder.remap = ''             # vq: .npy of used code indices to remap onto ('' = none)
  config.autoencoder.unknown_index = 'random'  # vq with remap: random | extra | an integer

  # The paper's LPIPSWithDiscriminator (kl) / VQLPIPSWithDiscriminator (vq).
  config.autoencoder_loss = ml_collections.ConfigDict()
  config.autoencoder_loss.pixel_loss = 'l1'  # l1 | l2 per-pixel reconstruction loss
  config.autoencoder_loss.kl_weight = 1e-6   # kl: weight of KL(q(z|x) || N(0, I))
  config.autoencoder_loss.codebook_weight = 1.0  # vq: weight of the codebook + commitment loss
  config.autoencoder_loss.logvar_init = 0.0  # kl: initial output log-variance (nll = rec/exp(logvar) + logvar)
  config.autoencoder_loss.learn_logvar = False  # kl: train logvar (the paper's optimizer leaves it at init)
  config.autoencoder_loss.perceptual_weight = 1.0  # LPIPS weight (0 = off: no VGG weights needed)
  config.autoencoder_loss.lpips_vgg_path = ''  # torchvision vgg16 ImageNet state dict (vgg16-397923af.pth)
  config.autoencoder_loss.lpips_heads_path = ''  # the lpips package's v0.1 linear heads (lpips/weights/v0.1/vgg.pth)
  config.autoencoder_loss.disc_start = 50001  # first step with the adversarial loss
  config.autoencoder_loss.disc_weight = 0.5   # times the adaptive weight |grad nll| / |grad g_loss|
  config.autoencoder_loss.disc_factor = 1.0   # scales generator and discriminator GAN terms once started
  config.autoencoder_loss.disc_loss = 'hinge'  # hinge | vanilla
  config.autoencoder_loss.disc_num_layers = 3  # PatchGAN depth (NLayerDiscriminator n_layers)
  config.autoencoder_loss.disc_ndf = 64       # PatchGAN base width
  config.autoencoder_loss.disc_use_actnorm = False  # ActNorm instead of BatchNorm in the discriminator

  config.autoencoder_train = ml_collections.ConfigDict()
  config.autoencoder_train.batch_size = 12       # global batch size
  config.autoencoder_train.num_steps = 100000    # total optimizer steps
  config.autoencoder_train.learning_rate = 4.5e-6  # Adam learning rate
  config.autoencoder_train.adam_b1 = 0.5
  config.autoencoder_train.adam_b2 = 0.9
  config.autoencoder_train.warmup_steps = 0      # linear warm-up from 0
  # Train post_quant_conv and the decoder only: the encoder, quant_conv and codebook keep their values, so the
  # latents (and a stage-2 model trained on them) stay valid; Stable Diffusion's ft-MSE decoder was made so.
  config.autoencoder_train.train_decoder_only = False
  config.autoencoder_train.checkpoint_every_steps = 5000
  config.autoencoder_train.accumulate_grad_batches = 1  # optimizer update every k steps (optax.MultiSteps)
  config.autoencoder_train.keep_checkpoints = 3  # how many recent checkpoints to keep
  config.autoencoder_train.keep_period = 0  # also keep every checkpoint whose step is a multiple (0 = none)
  config.autoencoder_train.sample_every_steps = 5000  # write a reconstruction grid
  config.autoencoder_train.num_sample_images = 8
  config.autoencoder_train.eval_every_steps = 5000  # validation PSNR/SSIM/LPIPS on the eval split (0 = off)

  # Reconstruction metrics of the stage-1 model on the eval split (data.eval_path / data.tfds_eval_split;
  # the synthetic source uses other seeds): during training and in eval_autoencoder mode.
  config.eval = ml_collections.ConfigDict()
  config.eval.num_images = 1000     # images to reconstruct (0 = the whole split)
  config.eval.batch_size = 16       # images per compiled call
  # eval_conditional: samples under eval.num_images held-out conditions, measured by networks trained here.
  config.eval.classifier_path = ''  # class-conditional models: python -m latent_diffusion.evaluate.classifier --out=...
  config.eval.parser_path = ''      # text/layout/semantic models on the synthetic set: ...evaluate.shapes_parser --out=...
  config.eval.samples_per_condition = 1  # SR/inpainting: K samples each, their mean also measured
  # Sample quality (eval_diffusion; eval_autoencoder adds rFID/rFD when a feature network is set).
  config.eval.feature_network = ''  # '' (none) | inception (FID, IS) | classifier (FD-<dataset>, IS-<dataset>)
  config.eval.inception_path = ''   # pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID Inception weights)
  config.eval.inception_resize = 'pytorch_fid'  # pytorch_fid (bilinear) | clean (clean-fid's PIL bicubic)
  config.eval.feature_dataset = ''  # classifier: the set it was trained on ('' = read from <classifier_path>.json)
  config.eval.num_samples = 50000   # eval_diffusion: samples drawn (the paper's 50k), in sample.batch_size batches
  config.eval.sample_format = 'npz'  # eval_diffusion: npz (uint8 shards) | png (one file per sample)
  config.eval.reference_split = 'train'  # the real images compared with: train | eval (data.eval_path / ...)
  config.eval.reference_images = 50000  # at most this many reference images (0 = the whole split)
  config.eval.reference_stats = ''  # a statistics .npz to use instead (ours, or pytorch-fid's mu/sigma)
  config.eval.stats_dir = ''        # cache of reference statistics ('' = <workdir>/reference_stats)
  config.eval.kid_subset_size = 1000
  config.eval.precision_recall_k = 3

  config.convert = ml_collections.ConfigDict()
  config.convert.source = ''        # convert mode: a paper .ckpt or diffusers weights file / folder
  config.convert.stage = 'autoencoder'  # autoencoder | diffusion (the U-Net, + first stage of a full LDM .ckpt)
  config.convert.use_ema = True     # diffusion from a paper .ckpt: take the EMA copy (model_ema.*) when present

  # Stage 2: the diffusion U-Net (the paper's unet_config).
  config.unet = ml_collections.ConfigDict()
  config.unet.model_channels = 192
  config.unet.channel_mult = (1, 2, 2, 4, 4)
  config.unet.num_res_blocks = 2
  config.unet.attention_resolutions = (1, 2, 4, 8)  # downsampling rates ds with attention
  config.unet.num_heads = 8
  config.unet.num_head_channels = -1        # fixed head width instead of num_heads (-1 = off)
  config.unet.num_heads_upsample = -1       # heads in the output blocks (-1 = num_heads)
  config.unet.use_scale_shift_norm = True   # time embedding as GroupNorm scale and shift
  config.unet.resblock_updown = True        # resample inside ResBlocks instead of plain convs
  config.unet.conv_resample = True          # plain resampling with a 3x3 conv
  config.unet.dropout = 0.0
  config.unet.in_channels = 0               # 0 = latent channels + concat-conditioning channels
  config.unet.num_classes = 0               # label embedding added to the time embedding (adm); 0 = none
  config.unet.use_spatial_transformer = False  # SpatialTransformer (self + cross-attention) for attention
  config.unet.transformer_depth = 1         # BasicTransformerBlocks per SpatialTransformer
  config.unet.context_dim = 0               # cross-attention context width (with the spatial transformer)
  config.unet.legacy = True                 # the paper's head-count rules (legacy: true in its configs)
  config.unet.use_new_attention_order = False  # fused qkv split as [q|k|v] x heads instead of heads x [q|k|v]
  config.unet.n_embed = 0                   # predict codebook ids (id_predictor head); 0 = off
  config.unet.attention_impl = 'auto'       # auto | einsum | xla | cudnn: attention kernel (auto = fastest measured)

  # The conditioning model (the paper's cond_stage_config) and the batch input it reads (cond_stage_key).
  config.cond_stage = ml_collections.ConfigDict()
  config.cond_stage.kind = ''               # '' (none) | class | transformer | spatial_rescaler | first_stage | identity
  config.cond_stage.key = 'label'           # batch input: label | caption | layout | segmentation | low_res | masked_image
  config.cond_stage.trainable = True        # train the conditioning model with the U-Net (cond_stage_trainable)
  config.cond_stage.n_classes = 1000        # class: embedding rows (include a null class for guidance)
  config.cond_stage.embed_dim = 512         # class: embedding width (= unet.context_dim)
  # transformer: the paper's TransformerEmbedder / BERTEmbedder (x-transformers Encoder, pre-norm).
  config.cond_stage.n_embed = 512           # transformer: width (= unet.context_dim)
  config.cond_stage.n_layer = 16            # transformer: attention layers
  config.cond_stage.vocab_size = 30522      # transformer: token embedding rows
  config.cond_stage.max_seq_len = 77        # transformer: tokens per condition (padded / truncated)
  config.cond_stage.embedding_dropout = 0.0  # transformer: dropout on the embedded tokens
  config.cond_stage.tokenizer = 'wordpiece'  # caption: wordpiece (a BERT vocab.txt) | word (words of the synthetic captions)
  config.cond_stage.vocab_path = ''         # wordpiece: path of a BERT vocab.txt (bert-base-uncased: 30522 tokens)
  config.cond_stage.layout_max_objects = 30  # layout: boxes per condition (the paper's OpenImages builder: 30)
  config.cond_stage.layout_encode_crop = True  # layout: two extra tokens for the crop (max_seq_len = 3 x objects + 2)
  # spatial_rescaler: one-hot semantic maps -> n_stages bilinear halvings -> a 1x1 conv to out_channels.
  config.cond_stage.n_stages = 1
  config.cond_stage.multiplier = 0.5
  config.cond_stage.method = 'bilinear'
  config.cond_stage.in_channels = 182       # spatial_rescaler: label classes of the map (one-hot width)
  config.cond_stage.out_channels = 3        # spatial_rescaler: channels concatenated to the latents
  config.cond_stage.bias = False
  # first_stage (inpainting): multiply the masked image's encoding by scale_factor (the paper: unscaled).
  config.cond_stage.scale_first_stage = False

  config.diffusion = ml_collections.ConfigDict()
  config.diffusion.timesteps = 1000
  config.diffusion.beta_schedule = 'linear'  # linear (in sqrt space) | cosine | sqrt_linear | sqrt
  config.diffusion.linear_start = 0.0015
  config.diffusion.linear_end = 0.0155
  config.diffusion.cosine_s = 8e-3
  config.diffusion.v_posterior = 0.0         # posterior variance = (1 - v) beta_tilde + v beta
  config.diffusion.parameterization = 'eps'  # what the U-Net predicts: eps | x0 | v
  config.diffusion.loss_type = 'l1'          # l1 | l2
  config.diffusion.l_simple_weight = 1.0     # weight of the simple loss
  config.diffusion.original_elbo_weight = 0.0  # weight of the VLB term (lvlb_weights[t] x simple loss)
  config.diffusion.learn_logvar = False      # learn a per-timestep log-variance: loss / exp(logvar_t) + logvar_t
  config.diffusion.logvar_init = 0.0         # its initial value
  config.diffusion.conditioning_key = ''     # '' (unconditional) | concat | crossattn | hybrid | adm
  config.diffusion.cond_drop_prob = 0.0      # training: replace the condition by the null condition (guidance)
  config.diffusion.clip_denoised = False     # DDPM sampler: clip x0 predictions to [-1, 1]
  config.diffusion.scale_by_std = True       # scale_factor = 1/std of the first batch's latents
  config.diffusion.scale_factor = 1.0        # used as is when scale_by_std is False

  config.diffusion_train = ml_collections.ConfigDict()
  config.diffusion_train.batch_size = 96
  config.diffusion_train.num_steps = 500000
  config.diffusion_train.learning_rate = 5e-5   # AdamW peak learning rate
  config.diffusion_train.weight_decay = 0.01    # AdamW (torch default, as the paper's optimizer)
  config.diffusion_train.warmup_steps = 10000   # linear warm-up from 1e-6 x learning_rate
  config.diffusion_train.cooldown_steps = 0     # linear decay to 0 over the last steps of num_steps (0 = none)
  config.diffusion_train.ema_decay = 0.9999     # with the paper's warm-up min(decay, (1+n)/(10+n))
  config.diffusion_train.checkpoint_every_steps = 5000
  config.diffusion_train.accumulate_grad_batches = 1  # optimizer update every k steps (optax.MultiSteps)
  config.diffusion_train.keep_checkpoints = 3
  config.diffusion_train.keep_period = 0  # also keep every checkpoint whose step is a multiple (0 = none)
  config.diffusion_train.sample_every_steps = 5000  # write a DDIM sample grid
  config.diffusion_train.precompute_latents = False  # encode the dataset once, train from the cache

  config.sample = ml_collections.ConfigDict()
  config.sample.num_samples = 16   # images per grid in sample mode
  config.sample.batch_size = 16    # images per compiled sampler call
  config.sample.sampler = 'ddim'   # ddim | ddpm | plms | dpm_solver (DPM-Solver++(2M))
  config.sample.num_steps = 50     # sampler steps (ddpm may take all diffusion.timesteps, the paper's chain)
  config.sample.eta = 0.0          # DDIM eta (0 = deterministic)
  config.sample.spacing = 'uniform'  # timestep spacing: uniform | quad | leading | trailing | linspace
  config.sample.guidance_scale = 1.0  # classifier-free guidance (1 = conditional only; needs a null class)
  config.sample.class_label = -1   # class-conditional models: the class of every sample (-1 = cycle classes)
  config.sample.use_ema = True     # sample with the EMA weights of the U-Net
  config.sample.seed = 0           # sample-mode noise seed
  config.sample.height = 0          # sample side lengths in pixels (0 = data.image_size); convolutional
  config.sample.width = 0           # models sample beyond their training size
  config.sample.prompt = ''         # text models: the caption of every sample; several separated by '|'
  config.sample.layout = ''         # layout models: a JSON file of boxes [{"class": k, "box": [x0, y0, x1, y1]}, ...]
  config.sample.segmentation = ''   # semantic models: a PNG of class indices
  config.sample.image = ''          # super-resolution: the low-resolution PNG; inpainting: the image to fill
  config.sample.mask = ''           # inpainting: a PNG, white where the image is to be filled
  config.sample.keep_known_latents = False  # inpainting, ddim: also reset the latents of known pixels to the
                                            # noised encoding of the masked image before every step (the
                                            # paper's masked DDIM, on top of the concat condition)
  config.sample.image_guidance_scale = 0.0  # super-resolution, inpainting: the paper's image-space guider
                                            # (0 = off): each step's eps is pushed towards latents whose
                                            # decoded x0 matches the input (downsampled by antialiased
                                            # bicubic; or on the known pixels)
  config.sample.init_image = ''     # sample mode, img2img (SDEdit): a PNG/JPEG whose stage-1 encoding, noised
                                    # to sample.strength, starts the sampler (any model, any condition)
  config.sample.strength = 0.8      # img2img: the fraction of the sampler's steps run from the noised image
                                    # (diffusers' strength; 1 starts at its noisiest step)

  config.lock()
  return config

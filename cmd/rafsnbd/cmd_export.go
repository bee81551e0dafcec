package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/oci"
	"github.com/rafsnbd/rafsnbd/verity"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "export",
			Usage:     "write an image's flat EROFS block device to a disk file, optionally with a dm-verity tree",
			ArgsUsage: " ",
			Description: `Composes the image (the bootstrap's blocks, then each blob's uncompressed
space at its mapped_blkaddr, zeros between) and writes it to a disk file that
the kernel mounts directly:

  rafsnbd export -B image.boot -D blobs/ -o image.disk
  mount -t erofs -o loop,ro image.disk /mnt

Holes stay sparse. The file appears under its name only when complete (it is
written to a temporary file in the same directory, synced to disk and
renamed). --no-fsync skips the sync, like cp without a sync after it: much
faster for a large image in the page cache, but a crash soon after can lose
the file.

With --verity a dm-verity hash tree (sha256, 4 KiB hash blocks, no salt, one
data block per EROFS block) is appended at the next 4 KiB boundary, hashed
while the data is written, and the line nydus-image prints is printed:

  dm-verity options: --no-superblock --format=1 -s "" --hash=sha256 ...

Pass those options to 'veritysetup open' (or 'veritysetup verify') with the
disk as both data and hash device. Mount with sizelimit= (the hash offset) to
keep the tree out of the filesystem's view. By default the tree is the one
'veritysetup format' writes; --verity-compat nydus reproduces nydus' bytes
(its unused hash slots hold the digest of a zero page), for byte-identical
output with nydus-image export --block --verity.

Without -o the disk is written beside the blobs in -D as <blob id>.image.disk
(the last blob's id, as nydus-snapshotter names image disks) or, with
--layer, <blob id>.layer.disk. With --image or --registry, give -o.`,
			Flags: append(imageFlags(),
				rootHashFlag(), // issue 12: pins the verity root of a lazily read --image
				&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "disk `FILE` to write"},
				&cli.BoolFlag{Name: "verity", Usage: "append a dm-verity hash tree and print its options"},
				&cli.StringFlag{Name: "verity-compat", Value: "standard", Usage: "`MODE` of the tree: standard (veritysetup) or nydus"},
				&cli.BoolFlag{Name: "layer", Usage: "name the default output as a layer disk (<blob id>.layer.disk)"},
				&cli.BoolFlag{Name: "no-fsync", Usage: "do not wait for the disk file to reach the disk (faster; a crash soon after may lose it)"},
				jsonFlag(),
			),
			Action: runExport,
		}
	})
}

func runExport(ctx context.Context, c *cli.Command) error {
	log := logger(ctx)
	compat, err := verity.ParseCompat(c.String("verity-compat"))
	if err != nil {
		return err
	}
	if c.IsSet("verity-compat") && !c.Bool("verity") {
		return fmt.Errorf("--verity-compat needs --verity")
	}
	if err := checkImageFlags(c, false); err != nil {
		return err
	}
	out := c.String("output")
	if out == "" && c.String("blob-dir") == "" {
		// No -D (--image, --registry): there is no blob directory to
		// write beside, and the current directory would be a surprise.
		return errors.New("the blobs are not in a -D directory to write the disk beside: give -o FILE (a converted image's disk is also kept by 'rafsnbd convert --export image')")
	}
	img, err := openImage(ctx, c, false)
	if err != nil {
		return err
	}
	defer img.Close()

	if out == "" {
		if len(img.Rafs.Blobs) == 0 {
			return fmt.Errorf("the image has no blobs to name the disk after: give -o FILE")
		}
		kind := "image"
		if c.Bool("layer") {
			kind = "layer"
		}
		out = filepath.Join(c.String("blob-dir"), oci.DiskName(img.Rafs.Blobs[len(img.Rafs.Blobs)-1].ID(), kind))
	}

	opts := blockdev.ExportOptions{NoSync: c.Bool("no-fsync")}
	if c.Bool("verity") {
		p := oci.VerityParams(img.Composed, compat)
		opts.Verity = &p
	}
	update, finish := newProgress(img.Size(), "export")
	opts.Progress = update
	start := time.Now()
	res, err := blockdev.Export(ctx, img, out, opts)
	finish()
	if err != nil {
		return err
	}
	elapsed := time.Since(start)
	log.Info().Str("disk", out).Int64("device_bytes", img.Size()).Int64("file_bytes", res.Size).
		Uint32("block_size", img.BlockSize()).Dur("took", elapsed).
		Str("rate", rate(img.Size(), elapsed)).Msg("exported")
	if c.Bool("json") {
		r := exportJSON{Disk: out, Bytes: res.Size, DeviceBytes: img.Size(), BlockSize: img.BlockSize(), TookNs: elapsed}
		if res.Tree != nil {
			r.Verity = verityReport(res.Tree)
		}
		return printJSON(c.Root().Writer, r)
	}
	if res.Tree != nil {
		fmt.Fprintln(c.Root().Writer, res.Tree.Options())
	} else {
		fmt.Fprintf(c.Root().Writer, "%s: %d bytes, %d blocks of %d\n", out, res.Size, img.Size()/int64(img.BlockSize()), img.BlockSize())
	}
	return nil
}

// exportJSON is what export --json prints.
type exportJSON struct {
	Disk        string        `json:"disk"`
	Bytes       int64         `json:"bytes"` // of the file: the device, then the tree
	DeviceBytes int64         `json:"device_bytes"`
	BlockSize   uint32        `json:"block_size"`
	TookNs      time.Duration `json:"took_ns"`
	Verity      *verityJSON   `json:"verity,omitempty"`
}

// rate formats bytes over a duration as MB/s.
func rate(bytes int64, d time.Duration) string {
	if d <= 0 {
		return "-"
	}
	return strconv.FormatFloat(float64(bytes)/d.Seconds()/1e6, 'f', 1, 64) + " MB/s"
}

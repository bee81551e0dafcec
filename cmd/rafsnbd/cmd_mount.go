package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"text/tabwriter"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/mounter"
	"github.com/rafsnbd/rafsnbd/nbd"
)

func init() {
	stateDirFlag := func() cli.Flag {
		return &cli.StringFlag{Name: "state-dir", Value: mounter.DefaultStateDir, Hidden: true, Usage: "`DIR` of the mount records"}
	}
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "mount",
			Usage:     "mount an image's EROFS filesystem on a directory, served by a background daemon",
			ArgsUsage: "MOUNTPOINT",
			Description: `Composes the image (-B/-D, --registry, --image, or a flat --disk), exposes
it to the kernel and mounts it read-only on MOUNTPOINT; returns once it is
mounted, leaving a daemon serving it (--foreground: serve in this process
until interrupted). 'rafsnbd umount MOUNTPOINT' undoes it all; 'rafsnbd
status' lists mounts.

--transport auto uses the kernel NBD driver where it exists (the nbd
module); else the device becomes one file on a FUSE mount under
--state-dir, which EROFS mounts directly (kernel 6.12+) or through a loop
device. A daemon killed under a FUSE mount leaves a filesystem whose reads
fail (EIO); 'rafsnbd umount', or 'rafsnbd mount' again, cleans it up. Under
an NBD mount reads wait (up to 60 s, then EIO) for 'rafsnbd mount' of the
same image on the same MOUNTPOINT again, which hands the same device to a
new daemon: the filesystem stays mounted.

--verity checks every read against a dm-verity tree in userspace, so a
changed byte reads as EIO: with --disk, the tree appended by 'rafsnbd export
--verity' (checked against --root-hash when given); otherwise a tree built
over the whole device at start (which guards against later changes to the
blobs or the cache). The root hash is shown by 'rafsnbd status'.`,
			Flags: append(append(imageFlags(), prefetchFlags()...),
				&cli.StringFlag{Name: "disk", Usage: "mount this flat disk `FILE` (an export, with or without its verity tree) instead of -B/-D"},
				&cli.StringFlag{Name: "transport", Value: mounter.TransportAuto, Usage: "`HOW` the kernel reads the device: auto, nbd or fuse"},
				&cli.BoolFlag{Name: "verity", Usage: "check every read against a dm-verity tree (EIO on a mismatch)"},
				&cli.StringFlag{Name: "root-hash", Usage: "with --verity --disk: the appended tree's expected root hash `HEX`; with --image: read it through its index and refuse another verity root"},
				&cli.BoolFlag{Name: "foreground", Usage: "serve in this process instead of a background daemon"},
				&cli.BoolFlag{Name: "loop", Hidden: true, Usage: "FUSE: mount through a loop device even where the file mounts directly"},
				stateDirFlag(),
			),
			Action: runMount,
		}
	})
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "umount",
			Usage:     "unmount what 'rafsnbd mount' mounted, stop its daemon, release its device",
			ArgsUsage: "MOUNTPOINT",
			Flags:     []cli.Flag{stateDirFlag()},
			Action:    runUmount,
		}
	})
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "status",
			Usage:     "list the mounts of 'rafsnbd mount' with their transport, device, image and read stats",
			ArgsUsage: " ",
			Flags:     []cli.Flag{jsonFlag(), stateDirFlag()},
			Action:    runStatus,
		}
	})
}

func runMount(ctx context.Context, c *cli.Command) error {
	if c.NArg() != 1 {
		return usagef(c, "give one MOUNTPOINT")
	}
	if c.IsSet("disk") {
		// A flat disk is served as it is: no image flag applies, and
		// --root-hash is its appended tree's root, not an index's.
		for _, f := range []string{"image", "bootstrap", "blob-dir", "registry", "backend", "insecure", "prefetch", "prefetch-all"} {
			if c.IsSet(f) {
				return usagef(c, "--disk is mounted as it is: drop --%s", f)
			}
		}
	} else if err := checkImageFlags(c, true); err != nil {
		return err
	}
	switch c.String("transport") {
	case mounter.TransportAuto, mounter.TransportNBD, mounter.TransportFUSE:
	default:
		return usagef(c, "--transport %q: want auto, nbd or fuse", c.String("transport"))
	}
	var root []byte
	if c.IsSet("root-hash") {
		var err error
		if root, err = hex.DecodeString(c.String("root-hash")); err != nil || len(root) != 32 {
			return usagef(c, "--root-hash %q: want 64 hex digits (sha256)", c.String("root-hash"))
		}
		if c.IsSet("disk") && !c.Bool("verity") {
			return usagef(c, "--root-hash with --disk is the root of its appended tree: give --verity too")
		}
		if !c.IsSet("disk") {
			root = nil // --image's: the index's root, pinned by openRef
		}
	}
	mountpoint := c.Args().First()
	if !c.Bool("foreground") {
		if _, err := mounter.CleanMountpoint(mountpoint); err != nil {
			return err
		}
		return mounter.Spawn(ctx, append(os.Args[1:], "--foreground"), c.String("state-dir"), mountpoint)
	}
	notify := mounter.Notifier()
	err := serveMount(ctx, c, mountpoint, root, notify)
	if notify != nil {
		notify(err) // a no-op once the mount reported ready
	}
	return err
}

func serveMount(ctx context.Context, c *cli.Command, mountpoint string, root []byte, notify func(error)) error {
	src, err := openNBDSource(ctx, c)
	if err != nil {
		return err
	}
	defer src.close()
	var dev mounter.Device = src.device
	bs := int(src.blockSize)
	if bs == 0 {
		bs = 4096
	}
	rootHex := ""
	if c.Bool("verity") {
		if c.IsSet("disk") {
			r, got, err := mounter.VerifyAppended(src.device, bs, root)
			switch {
			case errors.Is(err, mounter.ErrNoTree):
				logger(ctx).Info().Str("disk", src.describe).Msg("no verity tree appended: building one")
				if dev, err = mounter.VerifyBuilt(ctx, src.device, bs); err != nil {
					return err
				}
			case err != nil:
				return fmt.Errorf("--verity %s: %w", src.describe, err)
			default:
				dev, root = r, got
			}
		} else if dev, err = mounter.VerifyBuilt(ctx, src.device, bs); err != nil {
			return err
		}
		if root == nil {
			root = dev.(interface{ RootHash() []byte }).RootHash()
		}
		rootHex = hex.EncodeToString(root)
	} else if c.IsSet("root-hash") {
		rootHex = c.String("root-hash") // --image's index root, which openRef pinned
	}
	extra, fetches := blobStats(src.device, c.String("cache-dir") != "")
	return mounter.Serve(ctx, dev, mounter.Options{
		StateDir:   c.String("state-dir"),
		Mountpoint: mountpoint,
		Transport:  c.String("transport"),
		ForceLoop:  c.Bool("loop"),
		BlockSize:  src.blockSize,
		BackendID:  src.backendID,
		Image:      src.describe,
		CacheDir:   c.String("cache-dir"),
		RootHash:   rootHex,
		Extra:      extra,
		Fetches:    fetches,
		Logger:     logger(ctx),
		Ready:      notify,
	})
}

func runUmount(ctx context.Context, c *cli.Command) error {
	if c.NArg() != 1 {
		return usagef(c, "give one MOUNTPOINT")
	}
	return mounter.Unmount(ctx, c.String("state-dir"), c.Args().First(), logger(ctx))
}

func runStatus(ctx context.Context, c *cli.Command) error {
	if c.NArg() > 0 {
		return usagef(c, "unexpected argument %q", c.Args().First())
	}
	list, err := mounter.List(ctx, c.String("state-dir"), logger(ctx))
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if list == nil {
			list = []mounter.Status{}
		}
		return printJSON(c.Root().Writer, list)
	}
	w := tabwriter.NewWriter(c.Root().Writer, 0, 8, 2, ' ', 0)
	fmt.Fprintln(w, "MOUNTPOINT\tTRANSPORT\tDEVICE\tPID\tSTATE\tIMAGE\tROOT HASH\tSTATS")
	for _, s := range list {
		state := s.State
		switch {
		case s.Released:
			state = "released (daemon was dead)"
		case !s.Alive:
			state = "daemon dead"
		}
		dev := s.Device
		if dev == "" {
			dev = s.File
		}
		rootHash := s.RootHash
		if rootHash == "" {
			rootHash = "-"
		}
		stats := s.Stats.String()
		if s.Problem != "" {
			stats = s.Problem
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\n", s.Mountpoint, s.Transport, dev, s.PID, state, s.Image, rootHash, stats)
	}
	return w.Flush()
}

// blobStats returns, for an image whose blobs come through the blob cache,
// the sums of its blobs' counters for 'rafsnbd status' and the count of
// their backend requests; nils for a flat disk. Without a disk cache
// (onDisk false) nothing is kept across reads but a bounded set of chunks
// in memory: no cached figures then.
func blobStats(dev nbd.Device, onDisk bool) (func() map[string]int64, func() int64) {
	img, ok := dev.(*blockdev.Image)
	if !ok {
		return nil, nil
	}
	type statser interface{ Stats() blobcache.Stats }
	var blobs []statser
	for _, b := range img.Blobs {
		if h, ok := b.(statser); ok {
			blobs = append(blobs, h)
		}
	}
	if len(blobs) == 0 {
		return nil, nil
	}
	extra := func() map[string]int64 {
		m := map[string]int64{}
		for _, b := range blobs {
			st := b.Stats()
			m[mounter.ExtraFetchedBytes] += st.BackendBytes
			m[mounter.ExtraFetchRequests] += st.BackendReads
			if onDisk {
				m[mounter.ExtraCachedBytes] += st.ReadyBytes
				m[mounter.ExtraCachedUnits] += st.ReadyUnits
				m[mounter.ExtraUnits] += int64(st.Units)
			}
			m["fetch_errors"] += st.FetchErrors
			m["digest_errors"] += st.DigestErrors
		}
		return m
	}
	fetches := func() int64 {
		var n int64
		for _, b := range blobs {
			n += b.Stats().BackendReads
		}
		return n
	}
	return extra, fetches
}

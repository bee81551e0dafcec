package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/nbd"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "nbd",
			Usage:     "attach an image to the kernel as /dev/nbdN and serve it until interrupted",
			ArgsUsage: " ",
			Description: `Attaches a read-only device to the kernel's NBD driver and serves it from
this process over local sockets; no network is involved. Once the device is
ready its path (/dev/nbdN) is printed on stdout, one line, so a script can
wait for it and mount:

  rafsnbd nbd -B image.boot -D blobs/ >dev.txt &     # or: --disk image.disk
  until [ -s dev.txt ]; do sleep 0.1; done     # (check that rafsnbd still runs)
  mount -t erofs -o ro "$(cat dev.txt)" /mnt

SIGINT or SIGTERM disconnects the device and exits (unmount first: a
disconnected device fails every read). The nbd module must be loaded
(modprobe nbd); generic netlink is used, or the old ioctl interface when
netlink is missing or --ioctl is given.

Restarting without unmounting (netlink only): the device carries a backend
identifier (by default derived from the image; see --backend-id, shown in
/sys/block/nbdN/backend and by 'rafsnbd nbd status'). If rafsnbd dies
without disconnecting (a crash, kill -9, an upgrade), the device stays and
reads wait up to --dead-conn-timeout for a new server. Starting 'rafsnbd nbd'
again for the same image finds the device by its identifier and hands it new
sockets; the mount carries on. Reads that were in flight when the old server
died are sent again after --timeout, or within 30 s when it is 0.

Several --connections give the device that many queues, served in parallel.

Commands: 'rafsnbd nbd status' lists devices, 'rafsnbd nbd disconnect
/dev/nbdN' detaches one, whoever serves it.`,
			Flags: append(append(imageFlags(), prefetchFlags()...),
				rootHashFlag(), // issue 12: pins the verity root of a lazily read --image
				&cli.StringFlag{Name: "disk", Usage: "serve this flat disk `FILE`: an EROFS image such as `rafsnbd export` writes (instead of -B/-D)"},
				&cli.StringFlag{Name: "device", Value: "auto", Usage: "`/dev/nbdN` to use, or auto to take a free one"},
				&cli.IntFlag{Name: "connections", Value: 1, Usage: "number of sockets (kernel queues) serving the device, `N` in 1..32"},
				durationFlag("timeout", 0, "per-request timeout `DURATION`; 0 never fails a slow read (a positive value cuts a connection whose read takes longer)"),
				durationFlag("dead-conn-timeout", 2*time.Minute, "netlink: how long (`DURATION`) reads wait for a restarted server when every connection is dead, instead of failing"),
				&cli.BoolFlag{Name: "ioctl", Usage: "use the legacy ioctl interface instead of generic netlink (no restart without unmounting)"},
				&cli.StringFlag{Name: "backend-id", Usage: "netlink backend identifier `ID` tagging the device; default: derived from the image"},
				sizeFlag("block-size", 0, "logical block `SIZE`, a power of two from 512 to 64K; default: the EROFS image's block size, 4K if none"),
			),
			Action: runNBD,
			Commands: []*cli.Command{
				{
					Name:      "status",
					Usage:     "list the kernel's NBD devices with their size, server pid and backend identifier",
					ArgsUsage: " ",
					Action:    runNBDStatus,
				},
				{
					Name:      "disconnect",
					Usage:     "detach /dev/nbdN, whoever serves it (unmount first)",
					ArgsUsage: "/dev/nbdN",
					Action:    runNBDDisconnect,
				},
			},
		}
	})
}

// nbdSource is what `rafsnbd nbd` serves.
type nbdSource struct {
	device nbd.Device
	// blockSize is the filesystem's block size: the device's logical block
	// size must not exceed it.
	blockSize int64
	// backendID identifies the image, so that a restarted server finds the
	// device it left behind.
	backendID string
	// describe names the source in logs.
	describe string
	close    func() error
}

// openNBDSource builds the device to serve from the command's flags. It is
// the one place that knows where devices come from: an image's bootstrap
// and blobs composed by package blockdev, or a flat disk file.
func openNBDSource(ctx context.Context, c *cli.Command) (*nbdSource, error) {
	path := c.String("disk")
	switch {
	case haveImage(c) && path != "":
		return nil, errors.New("give either -B/-D or --disk, not both")
	case haveImage(c):
		return openImageSource(ctx, c)
	case path == "":
		return nil, errors.New("nothing to serve: give -B BOOTSTRAP -D BLOBDIR, or --disk FILE")
	}
	return openDiskSource(path)
}

// openImageSource composes the image named by -B/-D or --image. The
// backend id names the bootstrap's absolute path or the image reference, so
// a restarted server finds its device.
func openImageSource(ctx context.Context, c *cli.Command) (*nbdSource, error) {
	id, _, err := flagSource(c).identity()
	if err != nil {
		return nil, err
	}
	img, err := openImage(ctx, c, true)
	if err != nil {
		return nil, err
	}
	return &nbdSource{
		device:    img,
		blockSize: int64(img.BlockSize()),
		backendID: id,
		describe:  strings.TrimPrefix(id, "rafsnbd:"),
		close:     img.Close,
	}, nil
}

func openDiskSource(path string) (*nbdSource, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	d, err := openDisk(abs)
	if err != nil {
		return nil, err
	}
	return &nbdSource{
		device:    d,
		blockSize: d.blockSize,
		backendID: "rafsnbd:disk:" + abs,
		describe:  abs,
		close:     d.Close,
	}, nil
}

func runNBD(ctx context.Context, c *cli.Command) error {
	if c.NArg() > 0 {
		return usagef(c, "unexpected argument %q (subcommands: status, disconnect)", c.Args().First())
	}
	if err := checkImageFlags(c, true); err != nil {
		return err
	}
	log := logger(ctx)
	index, err := nbd.ParseDevice(c.String("device"))
	if err != nil {
		return fmt.Errorf("--device: %w", err)
	}
	src, err := openNBDSource(ctx, c)
	if err != nil {
		return err
	}
	defer src.close()

	blockSize := flagSize(c, "block-size")
	if blockSize == 0 {
		blockSize = src.blockSize
	}
	backendID := c.String("backend-id")
	if backendID == "" {
		backendID = src.backendID
	}
	att, err := nbd.AttachKernel(ctx, src.device, nbd.KernelOptions{
		Index:           index,
		Connections:     c.Int("connections"),
		BlockSize:       blockSize,
		Timeout:         flagDuration(c, "timeout"),
		DeadConnTimeout: flagDuration(c, "dead-conn-timeout"),
		BackendID:       backendID,
		UseIoctl:        c.Bool("ioctl"),
		Transmission:    nbd.TransmissionOptions{Logger: log},
		Logger:          log,
	})
	if err != nil {
		return err
	}
	log.Info().Str("device", att.Path).Str("method", att.Method).Int("connections", att.Connections).
		Bool("reattached", att.Reattached).Str("source", src.describe).Str("backend", backendID).
		Int64("size", src.device.Size()).Msg("serving")
	fmt.Fprintln(c.Root().Writer, att.Path)

	select {
	case <-ctx.Done():
		log.Info().Str("device", att.Path).Msg("disconnecting")
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := att.Detach(ctx); err != nil {
			return err
		}
		log.Info().Str("device", att.Path).Msg("disconnected")
		return nil
	case <-att.Done():
		if err := att.Err(); err != nil {
			return fmt.Errorf("%s: session ended: %w", att.Path, err)
		}
		log.Info().Str("device", att.Path).Msg("the kernel disconnected the device")
		return nil
	}
}

func runNBDStatus(ctx context.Context, c *cli.Command) error {
	devices, err := nbd.KernelStatus()
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(c.Root().Writer, 0, 8, 2, ' ', 0)
	fmt.Fprintln(w, "DEVICE\tCONNECTED\tSIZE\tPID\tBACKEND")
	for _, d := range devices {
		connected := "no"
		if d.Connected {
			connected = "yes"
		}
		pid := "-"
		if d.PID != 0 {
			pid = fmt.Sprint(d.PID)
		}
		backend := d.BackendID
		if backend == "" {
			backend = "-"
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", d.Path, connected, d.SizeBytes, pid, backend)
	}
	return w.Flush()
}

func runNBDDisconnect(ctx context.Context, c *cli.Command) error {
	if c.NArg() != 1 {
		return errors.New("usage: rafsnbd nbd disconnect /dev/nbdN")
	}
	index, err := nbd.ParseDevice(c.Args().First())
	if err != nil {
		return err
	}
	if index == nbd.AnyDevice {
		return errors.New("name the device to disconnect: /dev/nbdN")
	}
	return nbd.DisconnectKernel(index)
}

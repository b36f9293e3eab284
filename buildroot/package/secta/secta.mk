################################################################################
#
# secta
#
################################################################################

SECTA_VERSION = 0.1.0
# The repository this tree lives in (buildroot/ is one of its folders).
SECTA_SITE = $(BR2_EXTERNAL_SECTA_PATH)/..
SECTA_SITE_METHOD = local
SECTA_LICENSE = AGPL-3.0-or-later
# Build the one binary of the workspace.
SECTA_SUBDIR = firmware/secta

# Local sources are not downloaded, so Buildroot's download-time vendoring does
# not run for them: vendor the crates before the build (this step needs the
# network; the build and install steps run --offline). It is a pre-configure
# hook because only configure waits for the package's dependencies (host-rustc,
# which provides cargo); the rsync step does not.
define SECTA_CARGO_VENDOR
	cd $(@D) && mkdir -p .cargo && \
		$(HOST_MAKE_ENV) $(PKG_COMMON_CARGO_ENV) \
		cargo vendor --locked --versioned-dirs VENDOR > .cargo/config.toml
endef
SECTA_PRE_CONFIGURE_HOOKS += SECTA_CARGO_VENDOR

# Do not copy build output and the web app's node_modules.
SECTA_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude target --exclude node_modules --exclude demo-data

SECTA_FEATURES = $(call qstrip,$(BR2_PACKAGE_SECTA_FEATURES))
ifneq ($(SECTA_FEATURES),)
SECTA_CARGO_BUILD_OPTS += --features "$(SECTA_FEATURES)"
SECTA_CARGO_INSTALL_OPTS += --features "$(SECTA_FEATURES)"
endif

ifeq ($(BR2_PACKAGE_SECTA_WEB_UI),y)
define SECTA_INSTALL_WEB_UI
	if [ -f $(@D)/web-ui/dist/index.html ]; then \
		mkdir -p $(TARGET_DIR)/usr/share/secta/web-ui && \
		cp -a $(@D)/web-ui/dist/. $(TARGET_DIR)/usr/share/secta/web-ui/; \
	else \
		echo "secta: web-ui/dist is not built (cd web-ui && npm ci && npm run build); no web app in the image"; \
	fi
endef
SECTA_POST_INSTALL_TARGET_HOOKS += SECTA_INSTALL_WEB_UI
endif

$(eval $(cargo-package))

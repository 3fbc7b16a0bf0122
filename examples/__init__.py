"""Example policies built only through the public interface (`build-engines --policy module:factory`)."""
